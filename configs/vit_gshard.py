"""ViT on fashion_mnist with router 'gshard' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_gshard.py --workdir runs/vit_gshard

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.vit("gshard")
