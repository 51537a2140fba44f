"""Byte-level LM on the Python stdlib sources with router 'top_p' (dynamic routing, Huang et al.
2024: experts in order of probability until they sum to p = 0.4, at most 4; causal-safe), its
experts sized for 2 per token as top-2 (common.py); the realized experts per token is the
routing statistic experts_per_token.

  python -m experiments.train --config configs/lm_top_p.py --workdir runs/lm_top_p

Not yet measured.
"""
from configs import common


def get_config():
  return common.lm("top_p")
