"""Byte-level LM on multidomain_bytes (8 domains with labels) with the router named by the config
argument, at the active FLOPs of the dense model (common.with_router).

  python -m experiments.train --config configs/lm_domains.py:domain --workdir runs/lm_domain

The argument is dense or a causal-safe router (default 'topk'); 'domain' (DEMix) sends each
sequence to its domain's 2 of the 16 experts, in groups of 8 sequences (one of each domain), so
that its experts' capacity holds every choice (common.lm_domains). Evaluation reports bits per
byte per domain and their macro mean.
"""
from configs import common


def get_config(router="topk"):
  return common.lm_domains(router)
