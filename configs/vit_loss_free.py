"""ViT on fashion_mnist with router 'loss_free': auxiliary-loss-free balancing (Wang et al. 2024,
DeepSeek-V3), top-2 of softmax scores plus a per-expert bias updated after every step (equal
active FLOPs across routers; see common.py).

  python -m experiments.train --config configs/vit_loss_free.py --workdir runs/vit_loss_free

Add --config.model.moe.loss_free.score_function=sigmoid for DeepSeek-V3's sigmoid scores; the
bias moves by model.moe.loss_free.bias_update_rate (1e-3) per step. About 1.5 minutes on 2 CPU
cores with tcmalloc preloaded as the Makefile does (90 s measured 2026-11-26; 400 steps of 128
images, float32); reaches about 81.8% test accuracy (eval loss 0.50) with seed 0.
"""
from configs import common


def get_config():
  return common.vit("loss_free")
