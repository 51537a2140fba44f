"""Byte-level LM with random routing, the baseline without a router (equal active FLOPs;
common.py).

  python -m experiments.train --config configs/lm_random.py --workdir runs/lm_random

Each token goes to a uniformly random expert with gate 1 ('routing' rng in training, a fixed
key in evaluation); causal.
Not yet timed: only a 5-step smoke run was made, so no time or accuracy is claimed.
"""
from configs import common


def get_config():
  return common.lm("random")
