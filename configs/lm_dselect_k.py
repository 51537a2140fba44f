"""Byte-level LM on the Python stdlib sources with router 'dselect_k' (DSelect-k, Hazimeh et al.
2021: k = 2 selectors, each log2(E) smooth steps (gamma 1) over the binary codes of the 16
experts, mixed by a softmax; entropy regularizer at aux_loss_weight 1e-2; causal-safe), its
experts sized for 2 per token (common.py); a token uses every expert its gates do not zero, up to
E before the selectors saturate and at most k after: the routing statistic experts_per_token.

  python -m experiments.train --config configs/lm_dselect_k.py --workdir runs/lm_dselect_k

Not yet measured.
"""
from configs import common


def get_config():
  return common.lm("dselect_k")
