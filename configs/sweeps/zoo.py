"""The router zoo at equal active FLOPs on the fashion_mnist ViT: every router and layer variant
of configs/common.ZOO (dense, switch, gshard, topk, expert_choice, vmoe, soft, hash, random, base,
loss_free, cosine, sbase, top_p, remoe, dselect_k, moepp, stablemoe, smear, deepseek, residual,
mod), 3 seeds, through the same layer, loop and metrics.

  python -m experiments.sweep --sweep configs/sweeps/zoo.py --workdir runs/zoo --report

The steps and schedule of configs/sweeps/routers.py, so that the two results tables compare.
About 20 minutes on 2 CPU cores with --parallel 1 and tcmalloc preloaded as the Makefile does
(measured 2026-11-25, before cosine, sbase, top_p, remoe and dselect_k joined: 26 members of 120
steps at batch 128 in 19 min 14 s with --report, 36-50 s each; 24 min 42 s before that day's
train-step speedup). Results (means of the 2 seeds, eval accuracy 0.683-0.711, seed spread up to
0.035) are in README.md ("Router zoo").
Shows, per router, eval accuracy and loss, throughput, parameters, and balance (dropped
fraction, load CV, MaxVio).

A sweep has one base config, so the balancing comparison on the causal LM (loss-free bias vs
auxiliary loss vs no balancing, loss and MaxVio) is its own sweep: configs/sweeps/balancing.py.
Sparse upcycling needs a finished dense run first: configs/vit_upcycle.py.
"""
from configs import common
from configs.sweeps import routers


def get_sweep():
  sweep = routers.get_sweep()
  sweep["grid"]["config_arg"] = list(common.ZOO)
  # Two seeds give a paired t-interval 12.7 standard errors wide: three is the least that
  # can resolve anything.
  sweep["seeds"] = [0, 1, 2]
  return sweep
