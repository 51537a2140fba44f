"""Routing headroom on data with structure: the byte-level LM of configs/lm_domains.py on
multidomain_bytes (8 domains, balanced batches), dense, random, hash, top-2 and the DEMix domain
router at equal active FLOPs, paired over seeds.

  python -m experiments.sweep --sweep configs/sweeps/headroom.py --workdir runs/headroom --report

The brackets of routing: random (top-1, nothing learned, every expert sees every domain) and
domain (each domain's tokens to its own experts: what routing could gain if it knew the domain),
in two forms: 2 of the 16 experts of top-2's size per domain (top-2 inside them), and the
paper's one expert of the dense FFN's width per domain (8 experts, top-1).
`python -m experiments.headroom runs/headroom` places each other MoE member between them: its
paired difference to random and to domain, and the share of the random-to-domain gap it closes,
with a 95% interval (moe_jax/compare.gap_closed).
Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 40 x 32
windows (160 of each domain: 164k validation bytes), as the main job.

Run at commit 3d4aafe on 2 cores shared with other work: results/headroom/ (run.json: the time;
results.csv: every member), and RESULTS.md's "Routing on data with structure" (generated from
them). What it found: the domain router beats random routing (the headroom is there), but
learned top-2, hash routing and even dense beat both forms of the domain router: at 400 steps an
expert that sees one domain's 1/8 of the data loses to experts that share all of it, so the
oracle bracket is below the routers it should bound. Learned top-2 specializes little by domain.
"""
from configs.sweeps import moe_vs_dense

ROUTERS = ["dense", "random", "hash", "topk", "domain"]
# DEMix as the paper has it: one expert per domain (E = D = 8), top-1, each expert of the dense
# FFN's width, so its active FLOPs and its total parameters equal top-2's (16 of half width).
DEMIX = {"config_arg": "domain", "model.moe.num_experts": 8, "model.moe.k": 1,
         "model.moe.expert_hidden_dim": 512}


def get_sweep():
  return {
      "base": "configs/lm_domains.py",
      "fixed": moe_vs_dense.FIXED,
      "grid": {"config_arg": ROUTERS},
      "seeds": [0, 1, 2],
      "baseline": "random",
  }
