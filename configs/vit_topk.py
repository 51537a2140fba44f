"""ViT on fashion_mnist with router 'topk' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_topk.py --workdir runs/vit_topk

About 1.5 minutes on 2 CPU cores with tcmalloc preloaded as the Makefile does (100 s
measured 2026-11-25; 400 steps of 128 images, float32); reaches about
81.8% test accuracy (eval loss 0.50) with seed 0.
"""
from configs import common


def get_config():
  return common.vit("topk")
