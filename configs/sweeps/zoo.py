"""The router zoo at equal active FLOPs on the fashion_mnist ViT: every router and layer variant
of configs/common.ZOO (dense, switch, gshard, topk, expert_choice, loss_free, soft_moe, hash,
random, base, vmoe, deepseek, residual), 2 seeds, through the same layer, loop and metrics.

  python -m experiments.sweep --sweep configs/sweeps/zoo.py --workdir runs/zoo

Not yet timed: 26 members of 120 steps at batch 128; at the routers sweep's pace (about 1.5
minutes a member) roughly 40 minutes with --parallel 1. soft_moe, hash, random, base and vmoe
come from the routers branch: until it is merged (with their configs/common.ROUTER_K entries),
their members fail with a ValueError naming the router, and the others still run.
Shows, per router, eval accuracy and loss, throughput, parameters, and balance (dropped
fraction, load CV, MaxVio).

A sweep has one base config, so the balancing comparison on the causal LM (loss-free bias vs
auxiliary loss vs no balancing, loss and MaxVio) is its own sweep: configs/sweeps/balancing.py.
Sparse upcycling needs a finished dense run first: configs/vit_upcycle.py.
"""
from configs import common


def get_sweep():
  return {
      "base": "configs/vit.py",  # its argument picks the router or variant (common.with_router)
      "fixed": {"train.num_steps": 120, "train.warmup_steps": 12, "train.log_every": 10,
                "train.eval_every": 120, "train.checkpoint_every": 60},
      "grid": {"config_arg": list(common.ZOO), "seed": [0, 1]},
  }
