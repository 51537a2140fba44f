"""Byte-level LM on the Python stdlib sources with router 'loss_free' (auxiliary-loss-free
balancing: top-2 of the scores plus a per-expert bias, no load-balancing loss), at the active
FLOPs of the dense LM (common.py). Causal: each token picks its own top-k.

  python -m experiments.train --config configs/lm_loss_free.py --workdir runs/lm_loss_free

Compared with the aux-loss and no-balancing top-2 LMs by configs/sweeps/balancing.py. About 1 minute
on 2 CPU cores with tcmalloc preloaded as the Makefile does (61 s measured 2026-11-26; 400 steps of
32 x 128 bytes, float32); reaches about 2.23 bits per byte (59.5% next-byte accuracy) on 164k
validation bytes with seed 0.
"""
from configs import common


def get_config():
  return common.lm("loss_free")
