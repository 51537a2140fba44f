"""The main job (`make run`): does MoE beat the dense model of equal active FLOPs? The byte-level
LM (configs/lm.py: 4 layers, width 128, MoE in every layer, 16 experts) on the Python stdlib
sources, dense vs top-2 (Mixtral-style, experts of width mlp_dim / 2), paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense \
      --report

Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 164k
validation bytes. Members sharing a seed share their data order and every common initial
parameter, so summary.csv compares them seed by seed (moe_jax/compare.py).

Measured 2026-11-30 from a fresh clone on 2 cores: 10 min 40 s for `make run` (pip's cache warm;
the sweep 9.9 minutes, members 82-86 s dense, 111-114 s top-2; the 2048^2 matmul peak measured
316 GFLOP/s that evening against about 450 on earlier days with the same member times: these
small models are not bound by matmul throughput). Result: top-2 - dense = -0.0399 bits per
byte [-0.0726, -0.0072], 3 seeds, paired: better (2.18 against 2.22); top-2 trains at 0.752x
dense's tokens/s [0.713, 0.794]. (The train step before that evening's micro-batch scan gave
-0.0285 [-0.0483, -0.0086]: the same arithmetic in another order, whose rounding drifts over
400 steps, moved seed 1's difference from -0.020 to -0.055.)
Power: the spread over seeds is 0.020 bits per byte (dense) and 0.008 (top-2), the paired
difference's 0.013 (-0.034, -0.055, -0.031 at seeds 0, 1, 2). At that spread n paired seeds
detect (80% power, 5% two-sided) 0.131 / 0.041 / 0.027 / 0.022 bits per byte for n = 2 / 3 / 4
/ 5; unpaired, these 3 seeds give -0.0399 [-0.0824, +0.0026], not resolved (detectable: 0.055).
Hence 3 seeds: the smallest n whose detectable difference is near the effect (0.03-0.05 in the
one-seed runs that chose the recipe, 0.040 here), and the most that fits 15 minutes (each seed
costs 3.3 minutes). Members run one at a time: --parallel 2 measured 8.9 minutes for the sweep
against 9.9 (the same results to the last bit), but the members then share the cores unevenly
(CPU share 0.50 each, the last one alone at 0.88 and 1.8x the tokens/s), so the speed
comparison loses a seed (sweep.flag_contended) for 1 minute saved.
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
