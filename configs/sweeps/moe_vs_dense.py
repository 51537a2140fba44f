"""The main job (`make run`): does MoE beat the dense model of equal active FLOPs? The byte-level
LM (configs/lm.py: 4 layers, width 128, MoE in every layer, 16 experts) on the Python stdlib
sources, dense vs top-2 (Mixtral-style, experts of width mlp_dim / 2), paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense \
      --report

Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 164k
validation bytes. Members sharing a seed share their data order and every common initial
parameter, so summary.csv compares them seed by seed (moe_jax/compare.py).

`make run` took 10 min 40 s from a fresh clone on 2 cores on 2026-11-30 (the sweep 9.9 minutes;
README). The result, from the run committed in results/moe_vs_dense/ (run.json: its commit and
time), is the table of README's "The answer of `make run`" and RESULTS.md, generated from those
files by tools/results_tables.py: each group's bits per byte, top-2 - dense paired by seed with
its 95% interval and verdict, and top-2's tokens/s as a multiple of dense's (members that ran
beside other work left out).
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
      "base": "configs/lm.py",  # its argument picks the router at equal active FLOPs
      "fixed": FIXED,
      "grid": {"config_arg": ["dense", "topk"]},
      "seeds": [0, 1, 2],
      "baseline": "dense",
  }
