"""Routing headroom on data with structure: the byte-level LM of configs/lm_domains.py on
multidomain_bytes (8 domains, balanced batches), dense, random, hash, top-2 and the DEMix domain
router at equal active FLOPs, paired over seeds.

  python -m experiments.sweep --sweep configs/sweeps/headroom.py --workdir runs/headroom --report

The brackets of routing: random (top-1, nothing learned, every expert sees every domain) and
domain (each domain's tokens to its own 2 of the 16 experts: what routing could gain if it knew
the domain). `python -m experiments.headroom runs/headroom` places each other MoE member between
them: its paired difference to random and to domain, and the share of the random-to-domain gap
it closes, with a 95% interval (moe_jax/compare.gap_closed).
Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 40 x 32
windows (160 of each domain: 164k validation bytes), as the main job.
"""
from configs.sweeps import moe_vs_dense

ROUTERS = ["dense", "random", "hash", "topk", "domain"]


def get_sweep():
  return {
      "base": "configs/lm_domains.py",
      "fixed": moe_vs_dense.FIXED,
      "grid": {"config_arg": ROUTERS},
      "seeds": [0, 1, 2],
      "baseline": "random",
  }
