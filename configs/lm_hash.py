"""Byte-level LM with hash routing (Roller et al. 2021) by input byte, equal active FLOPs
(common.py).

  python -m experiments.train --config configs/lm_hash.py --workdir runs/lm_hash

The 256 byte values are split by a fixed random permutation into 8 buckets of 32
(routing.hash_buckets): every byte value always goes to the same expert. No router parameters, no
balancing loss; causal (a token's expert depends on its own byte only). About 1 minute on 2 CPU
cores with tcmalloc preloaded as the Makefile does (60 s measured 2026-11-26; 400 steps of 32 x 128
bytes, float32); reaches about 2.11 bits per byte (61.5% next-byte accuracy) on 164k validation
bytes with seed 0.
"""
from configs import common


def get_config():
  return common.lm("hash")
