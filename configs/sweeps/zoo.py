"""The router zoo at equal active FLOPs on the fashion_mnist ViT: every router and layer variant
of configs/common.zoo() (dense, switch, gshard, topk, expert_choice, vmoe, soft, hash, random, base,
loss_free, cosine, sbase, top_p, remoe, dselect_k, moepp, stablemoe, smear, deepseek, residual,
mod), 3 seeds, through the same layer, loop and metrics.

  python -m experiments.sweep --sweep configs/sweeps/zoo.py --workdir runs/zoo --report

The steps and schedule of configs/sweeps/routers.py, so that the two results tables compare:
66 members of 120 steps, about 80 minutes on 2 CPU cores. Its results are not quoted until it is
run again at the current code; the zoo's causal-safe routers on data with structure:
configs/sweeps/zoo_domains.py (docs/ROUTERS.md).
Shows, per router, eval accuracy and loss, throughput, parameters, and balance (dropped
fraction, load CV, MaxVio).

A sweep has one base config, so the balancing comparison on the causal LM (loss-free bias vs
auxiliary loss vs no balancing, loss and MaxVio) is its own sweep: configs/sweeps/balancing.py.
Sparse upcycling needs a finished dense run first: configs/vit_upcycle.py.
"""
from configs import common
from configs.sweeps import routers


def get_sweep(router_module=""):
  """The zoo; with the routers that router_module registers (model.moe.router_module of every
  member), from a sweep file of your own: `return zoo.get_sweep("examples.centroid_router")`."""
  sweep = routers.get_sweep()
  sweep["grid"]["config_arg"] = list(common.zoo(router_module))
  if router_module:
    sweep["fixed"]["model.moe.router_module"] = router_module
  # Two seeds give a paired t-interval 12.7 standard errors wide: three is the least that
  # can resolve anything.
  sweep["seeds"] = [0, 1, 2]
  return sweep
