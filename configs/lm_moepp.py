"""Byte-level LM on the Python stdlib sources with router 'moepp' (MoE++, Jin et al. 2024: beside
the 16 FFN experts 1 zero, 1 copy and 2 constant zero-computation experts, top-2 of softmax over
all 20; gating residuals pass each MoE layer's logits to the next; causal-safe), the experts of
top-2's width (see configs/vit_moepp.py); the routing statistics zero_computation_share and
experts_per_token give the realized FFN load.

  python -m experiments.train --config configs/lm_moepp.py --workdir runs/lm_moepp

Not yet measured.
"""
from configs import common


def get_config():
  return common.lm("moepp")
