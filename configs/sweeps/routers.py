"""Routers at equal active FLOPs: the ViT on fashion_mnist, dense vs the four MoE routers, 2 seeds.

  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers

About 15 minutes on 2 CPU cores with --parallel 1: 10 members of 120 steps at batch 128
(6400 tokens; about 0.58 s per step for gshard at 11k tokens/s), each about 1.5 minutes with
startup, compilation, two checkpoints and the evaluation of the 10k test images (one gshard
member measured at 104 s wall, its first 25 steps on a machine shared with other work).
Shows, per router, eval accuracy and loss after the same number of steps, throughput (tokens/s;
the routers' overhead over the dense FFN of the same active FLOPs), the parameters each router
adds, and how balanced the routing ends up (dropped fraction, load CV, MaxVio); the two seeds
show how much of a difference is noise.
"""


def get_sweep():
  return {
      "base": "configs/vit.py",  # its argument picks the router at equal active FLOPs
      "fixed": {"train.num_steps": 120, "train.warmup_steps": 12, "train.log_every": 10,
                "train.eval_every": 40, "train.checkpoint_every": 60},
      "grid": {"config_arg": ["dense", "switch", "gshard", "topk", "expert_choice"],
               "seed": [0, 1]},
  }
