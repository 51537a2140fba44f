"""The router zoo at equal active FLOPs: the ViT on fashion_mnist, switch against V-MoE noisy top-2,
Soft MoE, hash, random and BASE routing, 2 seeds.

  python -m experiments.sweep --sweep configs/sweeps/zoo.py --workdir runs/zoo

The steps and schedule of configs/sweeps/routers.py, so that the two results tables compare.
Not yet timed (each router's config only smoke-tested for 5 steps).
"""
from configs.sweeps import routers


def get_sweep():
  sweep = routers.get_sweep()
  sweep["grid"]["config_arg"] = ["switch", "vmoe", "soft", "hash", "random", "base"]
  return sweep
