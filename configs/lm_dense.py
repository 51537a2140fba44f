"""Byte-level LM on the Python stdlib sources with router 'dense' (equal active FLOPs; common.py).

  python -m experiments.train --config configs/lm_dense.py --workdir runs/lm_dense

About 1 minute on 2 CPU cores with tcmalloc preloaded as the Makefile does (61 s
measured 2026-11-25; 400 steps of 32 x 128 bytes, float32); reaches about
2.22 bits per byte (59.6% next-byte accuracy) on 164k validation bytes with seed 0.
"""
from configs import common


def get_config():
  return common.lm("dense")
