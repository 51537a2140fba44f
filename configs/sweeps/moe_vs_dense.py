"""The main job (`make run`): does MoE beat the dense model of equal active FLOPs? The byte-level
LM (configs/lm.py: 4 layers, width 128, MoE in every layer, 16 experts) on the Python stdlib
sources, dense vs top-2 (Mixtral-style, experts of width mlp_dim / 2), paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense \
      --report

Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 164k
validation bytes. Members sharing a seed share their data order and every common initial
parameter, so summary.csv compares them seed by seed (moe_jax/compare.py).

Measured 2026-11-30 from a fresh clone on 2 cores (matmul peak about 450 GFLOP/s): 10 min 46 s
for `make run` (members 82-85 s dense, 111-122 s top-2). Result: top-2 - dense = -0.0285 bits
per byte [-0.0483, -0.0086], 3 seeds, paired: better (2.20 against 2.22); top-2 trains at 0.71x
dense's tokens/s [0.62, 0.82].
Power: the spread over seeds is 0.020 bits per byte (dense) and 0.026 (top-2), but the paired
difference's only 0.008 (-0.036, -0.020, -0.029 at seeds 0, 1, 2). At that spread n paired seeds
detect (80% power, 5% two-sided) 0.079 / 0.025 / 0.017 / 0.013 bits per byte for n = 2 / 3 / 4
/ 5; unpaired, 3 seeds would detect only 0.060. Hence 3 seeds: the smallest n whose detectable
difference (0.025) is below the effect (0.03-0.05 in the one-seed runs that chose the recipe),
and the most that fits 15 minutes (each seed costs 3.3 minutes; --parallel 2 was not measured
against 1, so the members run one at a time, which also keeps their tokens/s uncontended).
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
