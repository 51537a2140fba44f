"""Routers at equal active FLOPs: the ViT on fashion_mnist, dense vs the four MoE routers, 2 seeds.

  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers

About 7 minutes on 2 CPU cores with --parallel 1 and tcmalloc preloaded, as `make run` does
(measured 2026-11-26: 6 min 39 s with --report from a fresh clone, 10 members of 120 steps at batch
128, about 37 s each with startup, compilation, three evaluations of the 10k test images and two
checkpoints; 7 min 38 s on 2026-11-25, 9 min 32 s before that day's train-step speedup, and 13 min
36 s with glibc's malloc). Result: eval accuracy 0.69-0.72 after 120 steps; every MoE router within
about 0.01 of the others and up to 0.01 above dense (means over the 2 seeds: dense 0.693, switch
0.698, gshard 0.707, topk 0.704, expert_choice 0.709; seed spread 0.02); dense trains at 43-44k
tokens/s, the MoE routers (index path) at 36-41k; switch drops 18-22% of its choices at cf 1.25,
top-2 12-15%.
Shows, per router, eval accuracy and loss after the same number of steps, throughput (tokens/s;
the routers' overhead over the dense FFN of the same active FLOPs), the parameters each router
adds, and how balanced the routing ends up (dropped fraction, load CV, MaxVio); the two seeds
show how much of a difference is noise.
"""


def get_sweep():
  return {
      "base": "configs/vit.py",  # its argument picks the router at equal active FLOPs
      "fixed": {"train.num_steps": 120, "train.log_every": 10,
                "train.eval_every": 40, "train.checkpoint_every": 60},
      "grid": {"config_arg": ["dense", "switch", "gshard", "topk", "expert_choice"]},
      "seeds": [0, 1],
      "baseline": "dense",
  }
