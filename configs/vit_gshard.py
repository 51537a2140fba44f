"""ViT on fashion_mnist with router 'gshard' (equal active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_gshard.py --workdir runs/vit_gshard

About 1.5 minutes on 2 CPU cores with tcmalloc preloaded as the Makefile does (103 s
measured 2026-11-25; 400 steps of 128 images, float32); reaches about
81.5% test accuracy (eval loss 0.51) with seed 0.
"""
from configs import common


def get_config():
  return common.vit("gshard")
