"""Byte-level LM on the Python stdlib sources with router 'gshard' (equal active FLOPs; common.py).

  python -m experiments.train --config configs/lm_gshard.py --workdir runs/lm_gshard

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.lm("gshard")
