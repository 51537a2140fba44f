"""ViT on fashion_mnist with router 'switch' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.vit("switch")
