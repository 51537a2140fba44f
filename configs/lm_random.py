"""Byte-level LM with random routing, the baseline without a router (equal active FLOPs;
common.py).

  python -m experiments.train --config configs/lm_random.py --workdir runs/lm_random

Each token goes to a uniformly random expert with gate 1 ('routing' rng in training, a fixed key in
evaluation); causal. About 1 minute on 2 CPU cores with tcmalloc preloaded as the Makefile does (62
s measured 2026-11-26; 400 steps of 32 x 128 bytes, float32); reaches about 2.34 bits per byte
(57.6% next-byte accuracy) on 164k validation bytes with seed 0.
"""
from configs import common


def get_config():
  return common.lm("random")
