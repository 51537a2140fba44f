"""The main job (`make run`): does MoE beat the dense model of equal active FLOPs? The byte-level
LM (configs/lm_domains.py: 4 layers, width 128, MoE in every layer, 16 experts) on
multidomain_bytes (8 domains: five natural languages in three scripts, Python, C, HTML; every
batch holds each domain equally), dense vs top-2 (Mixtral-style, experts of width mlp_dim / 2),
paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense \
      --report

Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 160
validation windows of each domain (164k bytes). Members sharing a seed share their data order and
every common initial parameter, so summary.csv compares them seed by seed (moe_jax/compare.py).

Why this data: on the Python stdlib alone (configs/lm.py) the same comparison sits at the edge of
what 3 seeds resolve (RESULTS.md, "The main job", its run on the stdlib: results/
moe_vs_dense_stdlib); on data with structure the routers have something to exploit and the
difference is resolved. The headroom sweep, which places every router between random and domain
routing on the same data (15 members), takes about 15 minutes of training alone, so that with
setup and report it would not fit make run's 15 minutes: make run is its dense and top-2.
The result, from the run committed in results/moe_vs_dense/ (run.json: its commit and time), is
the table of README's "The answer of `make run`" and RESULTS.md, generated from those files by
tools/results_tables.py: each group's bits per byte, top-2 - dense paired by seed with its 95%
interval and verdict, and top-2's tokens/s as a multiple of dense's (members that ran beside
other work left out); the time of `make run` from a fresh clone is in the README.
Why 3 seeds: the paired difference's spread over seeds is several times smaller than dense's own,
so 3 paired seeds resolve a difference of a few hundredths of a bit per byte that 3 unpaired
seeds cannot (summary.csv's `detectable` column: 80% power at the observed spread), and 3 are
the most that fit 15 minutes. Members run one at a time: --parallel 2 saved a minute with the
same results to the last bit, but its members share the cores unevenly (the last one runs
alone), so the speed comparison would lose a seed (sweep.flag_contended).
"""

FIXED = {"train.num_steps": 400, "train.log_every": 20,
         "train.eval_every": 400, "train.checkpoint_every": 200}


def get_sweep():
  return {
      "base": "configs/lm_domains.py",  # its argument picks the router at equal active FLOPs
      "fixed": FIXED,
      "grid": {"config_arg": ["dense", "topk"]},
      "seeds": [0, 1, 2],
      "baseline": "dense",
  }
