"""Routing headroom on data with structure: the byte-level LM of configs/lm_domains.py on
multidomain_bytes (8 domains, balanced batches), dense, random, hash, top-2 and the DEMix domain
router at equal active FLOPs, paired over seeds.

  python -m experiments.sweep --sweep configs/sweeps/headroom.py --workdir runs/headroom --report
  python -m experiments.headroom runs/headroom

The brackets of routing: random (top-1, nothing learned, every expert sees every domain) and
domain (each sequence to its domain's 2 of the 16 experts, top-2 among them, in groups of 8
sequences so that its experts' capacity holds every choice: what routing could gain if it knew
the domain). experiments.headroom places each other member between them: its paired difference
to random and to domain, and the share of the random-to-domain gap it closes, with Fieller's 95%
interval (moe_jax/compare.gap_closed). DEMix's paper form (one full-width expert a domain) and
the rest of the zoo: configs/sweeps/zoo_domains.py, whose members include these 15.
Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 40 x 32
windows (160 of each domain: 164k validation bytes), as the main job.

Time and result (results/headroom/: run.json, results.csv; RESULTS.md's "Routing on data with
structure", generated from them): 15 members, 15.6 minutes added up on 2 cores
(one member beside a test run). The headroom is there: the domain router beats random routing,
dense and top-2; top-2 closes most of the gap, hash routing (by the input byte, which tells the
scripts apart) all of it. Learned top-2 specializes little by domain.
Why make run is not this sweep: from a fresh clone its setup, data and report would take it
past make run's 15 minutes.
"""
from configs.sweeps import moe_vs_dense

ROUTERS = ["dense", "random", "hash", "topk", "domain"]
# DEMix as the paper has it (a member of zoo_domains.py): one expert per domain (E = D = 8),
# top-1, each expert of the dense FFN's width, so its active FLOPs and its total parameters
# equal top-2's (16 of half width).
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
