"""ViT on fashion_mnist with router 'topk' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_topk.py --workdir runs/vit_topk

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.vit("topk")
