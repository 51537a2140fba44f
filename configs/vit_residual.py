"""ViT on fashion_mnist with Residual-MoE layers (PR-MoE, Rajbhandari et al. 2022) at the active
FLOPs of the dense ViT (common.py).

  python -m experiments.train --config configs/vit_residual.py --workdir runs/vit_residual

Each MoE layer runs a top-1 (switch) expert of width 256 and a dense MLP of width 256
(model.moe.residual=True), mixed per token by a learned 2-way softmax coefficient as in DeepSpeed-
MoE. About 1.5 minutes on 2 CPU cores with tcmalloc preloaded as the Makefile does (92 s measured
2026-11-26; 400 steps of 128 images, float32); reaches about 80.9% test accuracy (eval loss 0.52)
with seed 0.
"""
from configs import common


def get_config():
  return common.vit("residual")
