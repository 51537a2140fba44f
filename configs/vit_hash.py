"""ViT on fashion_mnist with hash routing (Roller et al. 2021) by token position, equal active
FLOPs (common.py).

  python -m experiments.train --config configs/vit_hash.py --workdir runs/vit_hash

Each of the 50 positions (class token + 49 patches) goes to a fixed expert: a fixed random
permutation of the positions split into 8 buckets of 6 or 7 (routing.hash_buckets). No router
parameters and no balancing loss.
Not yet timed: only a 5-step smoke run was made, so no time or accuracy is claimed.
"""
from configs import common


def get_config():
  return common.vit("hash")
