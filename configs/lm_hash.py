"""Byte-level LM with hash routing (Roller et al. 2021) by input byte, equal active FLOPs
(common.py).

  python -m experiments.train --config configs/lm_hash.py --workdir runs/lm_hash

The 256 byte values are split by a fixed random permutation into 8 buckets of 32
(routing.hash_buckets): every byte value always goes to the same expert. No router parameters,
no balancing loss; causal (a token's expert depends on its own byte only).
Not yet timed: only a 5-step smoke run was made, so no time or accuracy is claimed.
"""
from configs import common


def get_config():
  return common.lm("hash")
