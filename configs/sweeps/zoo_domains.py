"""The router zoo on data with structure: every causal-safe router and variant of
configs/common.zoo() on the byte-level LM of configs/lm_domains.py (multidomain_bytes, 8 domains,
balanced batches), with the domain router (DEMix, the oracle bracket), at equal active FLOPs,
paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/zoo_domains.py --workdir runs/zoo_domains
  python -m experiments.headroom runs/zoo_domains

The members of configs/sweeps/headroom.py (dense, random, hash, top-2, domain; the same configs
and seeds, so the same numbers to the last bit), DEMix as the paper has it (one full-width
expert per domain, headroom.DEMIX) and the rest of the zoo, trained as the main job
(400 steps of 32 x 128 bytes, evaluated once at the end on 160 windows of each domain). Routers
that read later tokens of the group to route a token (expert choice, Soft MoE, BASE, S-BASE,
SMEAR) cannot train a causal LM and are left out.

Time and result (results/zoo_domains/: run.json, results.csv; the table of docs/ROUTERS.md,
"Router zoo", generated from them by tools/results_tables.py): 57 members one at a time, 63
minutes on 2 cores. 3 seeds resolve most routers against top-2 as well as against dense: the
domain router, both forms, and hash routing beat top-2; most of the others lose to it.
"""
from configs import common
from configs.sweeps import headroom, moe_vs_dense
from moe_jax import routers


def causal_safe(name: str) -> bool:
  """dense and the layer variants (deepseek: top-k, residual: top-1, mod: a causal predictor) are;
  a router is when it routes a token from that token alone (Router.causal_safe)."""
  return name not in routers.names() or routers.get(name).causal_safe


def get_sweep(router_module=""):
  names = [name for name in common.zoo(router_module) if causal_safe(name)] + ["domain"]
  fixed = dict(moe_vs_dense.FIXED)
  if router_module:
    fixed["model.moe.router_module"] = router_module
  return {
      "base": "configs/lm_domains.py",
      "fixed": fixed,
      "members": [{"config_arg": name} for name in names] + [headroom.DEMIX],
      "seeds": [0, 1, 2],
      "baseline": "dense",
  }
