"""ViT on fashion_mnist with DeepSeekMoE layers: fine-grained and shared experts at the active
FLOPs of the dense ViT (common.py).

  python -m experiments.train --config configs/vit_deepseek.py --workdir runs/vit_deepseek

The top-2 layer's 8 experts of width 256 are split 4 ways (model.moe.granularity=4): 32 experts of
width 64, 8 active per token, of which 2 are always-on shared experts
(model.moe.num_shared_experts=2) and 6 routed (model.moe.k=6): 8 x 64 = mlp_dim 512. About 2 minutes
on 2 CPU cores with tcmalloc preloaded as the Makefile does (119 s measured 2026-11-26; 400 steps of
128 images, float32); reaches about 81.1% test accuracy (eval loss 0.51) with seed 0.
"""
from configs import common


def get_config():
  return common.vit("deepseek")
