"""ViT on fashion_mnist with Residual-MoE layers (PR-MoE, Rajbhandari et al. 2022) at the active
FLOPs of the dense ViT (common.py).

  python -m experiments.train --config configs/vit_residual.py --workdir runs/vit_residual

Each MoE layer runs a top-1 (switch) expert of width 256 and a dense MLP of width 256
(model.moe.residual=True), mixed per token by a learned 2-way softmax coefficient as in
DeepSpeed-MoE. Not yet timed (the 400-step run has not been made).
"""
from configs import common


def get_config():
  return common.vit("residual")
