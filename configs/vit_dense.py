"""ViT on fashion_mnist with router 'dense' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_dense.py --workdir runs/vit_dense

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.vit("dense")
