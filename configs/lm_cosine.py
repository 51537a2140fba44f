"""Byte-level LM on the Python stdlib sources with router 'cosine' (X-MoE, Chi et al. 2022: top-1
of a cosine-similarity softmax in 16 dimensions with a learned temperature; causal-safe), at the
dense LM's active FLOPs (common.py).

  python -m experiments.train --config configs/lm_cosine.py --workdir runs/lm_cosine

Not yet measured.
"""
from configs import common


def get_config():
  return common.lm("cosine")
