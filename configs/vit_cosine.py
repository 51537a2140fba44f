"""ViT on fashion_mnist with router 'cosine' (X-MoE, Chi et al. 2022: top-1 of a cosine-similarity
softmax in 16 dimensions with a learned temperature), at the dense model's active FLOPs
(common.py).

  python -m experiments.train --config configs/vit_cosine.py --workdir runs/vit_cosine

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("cosine")
