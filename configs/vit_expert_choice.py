"""ViT on fashion_mnist with router 'expert_choice' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_expert_choice.py --workdir runs/vit_expert_choice

TIMING_AND_RESULT
"""
from configs import common


def get_config():
  return common.vit("expert_choice")
