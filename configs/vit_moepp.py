"""ViT on fashion_mnist with router 'moepp' (MoE++, Jin et al. 2024: beside the 8 FFN experts 1
zero, 1 copy and 2 constant zero-computation experts, top-2 of softmax over all 12; gating
residuals pass each MoE layer's logits to the next), the experts of top-2's width, as the paper
compares MoE++ with the MoE of the same FFN experts: a token that picks a zero-computation
expert skips an FFN, so the active FLOPs are below dense's (counted at the expected 2 * 8 / 12 FFN
experts per token; the routing statistics zero_computation_share and experts_per_token give the
realized ones).

  python -m experiments.train --config configs/vit_moepp.py --workdir runs/vit_moepp

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("moepp")
