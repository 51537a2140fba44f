"""Byte-level LM on the Python stdlib sources with router 'loss_free' (auxiliary-loss-free
balancing: top-2 of the scores plus a per-expert bias, no load-balancing loss), at the active
FLOPs of the dense LM (common.py). Causal: each token picks its own top-k.

  python -m experiments.train --config configs/lm_loss_free.py --workdir runs/lm_loss_free

Compared with the aux-loss and no-balancing top-2 LMs by configs/sweeps/balancing.py.
Not yet timed (the 400-step run has not been made).
"""
from configs import common


def get_config():
  return common.lm("loss_free")
