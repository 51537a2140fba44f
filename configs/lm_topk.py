"""Byte-level LM on the Python stdlib sources with router 'topk' (equal active FLOPs; common.py).

  python -m experiments.train --config configs/lm_topk.py --workdir runs/lm_topk

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.lm("topk")
