"""ViT on fashion_mnist with router 'top_p' (dynamic routing, Huang et al. 2024: experts in order of
probability until they sum to p = 0.4, at most 4), its experts sized for 2 per token as top-2
(common.py); the realized experts per token is the routing statistic experts_per_token.

  python -m experiments.train --config configs/vit_top_p.py --workdir runs/vit_top_p

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("top_p")
