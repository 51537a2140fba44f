"""Byte-level LM on the Python stdlib sources with router 'switch' (equal active FLOPs; common.py).

  python -m experiments.train --config configs/lm_switch.py --workdir runs/lm_switch

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.lm("switch")
