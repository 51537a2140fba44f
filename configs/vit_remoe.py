"""ViT on fashion_mnist with router 'remoe' (ReMoE, Wang et al. 2024: gates ReLU(x W), every expert
with a positive gate; an L1 penalty weighted by each expert's load, its coefficient lambda
adapting each step from 1e-8 by x1.2^sign to hold k = 1 expert per token), its experts sized for
1 per token, aux_loss_weight 1 so lambda is the whole coefficient (common.py); the realized
experts per token is the routing statistic experts_per_token.

  python -m experiments.train --config configs/vit_remoe.py --workdir runs/vit_remoe

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("remoe")
