"""Byte-level LM on the Python stdlib sources with router 'dense' (equal active FLOPs; common.py).

  python -m experiments.train --config configs/lm_dense.py --workdir runs/lm_dense

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.lm("dense")
