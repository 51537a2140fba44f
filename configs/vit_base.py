"""ViT on fashion_mnist with BASE layers (Lewis et al. 2021), equal active FLOPs (common.py).

  python -m experiments.train --config configs/vit_base.py --workdir runs/vit_base

Training: each group of 200 tokens is split exactly 25 per expert by a balanced assignment
maximizing the token-expert affinities (annealed Sinkhorn + greedy balanced rounding,
routing.balanced_assignment); evaluation: greedy top-1. Gate sigmoid(affinity). No balancing loss
needed; not causal in training, so there is no LM config. About 2 minutes on 2 CPU cores with
tcmalloc preloaded as the Makefile does (121 s measured 2026-11-26; 400 steps of 128 images,
float32); reaches about 81.5% test accuracy (eval loss 0.52) with seed 0.
"""
from configs import common


def get_config():
  return common.vit("base")
