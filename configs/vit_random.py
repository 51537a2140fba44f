"""ViT on fashion_mnist with random routing, the baseline without a router (equal active FLOPs;
common.py).

  python -m experiments.train --config configs/vit_random.py --workdir runs/vit_random

Each token goes to a uniformly random expert with gate 1, drawn from the 'routing' rng in
training and from a fixed key in evaluation. No router parameters and no balancing loss.
Not yet timed: only a 5-step smoke run was made, so no time or accuracy is claimed.
"""
from configs import common


def get_config():
  return common.vit("random")
