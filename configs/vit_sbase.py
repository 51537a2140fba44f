"""ViT on fashion_mnist with router 'sbase' (S-BASE, Clark et al. 2022: top-1 of a Sinkhorn-balanced
plan in training, of the logits in evaluation, sigmoid gate), at the dense model's active FLOPs
(common.py). Not causal: no LM config.

  python -m experiments.train --config configs/vit_sbase.py --workdir runs/vit_sbase

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("sbase")
