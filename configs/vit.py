"""ViT on fashion_mnist with the router named by the config argument (default 'switch').

  python -m experiments.train --config configs/vit.py:gshard --workdir runs/vit_gshard

The argument is one of dense, switch, gshard, topk, expert_choice, vmoe, soft, hash, random,
base, loss_free, or the layer variants deepseek and residual; every choice has the active FLOPs
of the dense model (common.with_router), except mod (Mixture-of-Depths), which has fewer.
Sweeps pick the router with their `config_arg`.
"""
from configs import common


def get_config(router="switch"):
  return common.vit(router)
