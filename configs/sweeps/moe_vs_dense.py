"""The main job (`make run`): does MoE beat the dense model of equal active FLOPs? The byte-level
LM (configs/lm.py: 4 layers, width 128, MoE in every layer, 16 experts) on the Python stdlib
sources, dense vs top-2 (Mixtral-style, experts of width mlp_dim / 2), paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense \
      --report

Each member trains 400 steps of 32 x 128 bytes and is evaluated once, at the end, on 164k
validation bytes. Members sharing a seed share their data order and every common initial
parameter, so summary.csv compares them seed by seed (moe_jax/compare.py).
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
