"""Byte-level LM on the Python stdlib sources with the router named by the config argument.

  python -m experiments.train --config configs/lm.py:topk --workdir runs/lm_topk

The argument is one of dense, switch, gshard, topk, vmoe, hash, random, loss_free, deepseek,
residual (default 'switch'; expert_choice, soft and base read future tokens and are refused in a
causal decoder); every choice has the active FLOPs of the dense model (common.with_router).
"""
from configs import common


def get_config(router="switch"):
  return common.lm(router)
