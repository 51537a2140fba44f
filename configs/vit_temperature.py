"""ViT on fashion_mnist with the example router 'temperature' (examples/temperature_router.py):
top-2 of softmax(logits / t) with a learned t, at the dense model's active FLOPs.

  python -m experiments.train --config configs/vit_temperature.py --workdir runs/vit_temperature

The config imports the router's module, which registers it; router_module names that module so
that the run's saved config loads again (analysis) without this file.
"""
import examples.temperature_router  # noqa: F401  registers 'temperature'
from configs import common


def get_config():
  config = common.vit("temperature")
  config.model.moe.router_module = "examples.temperature_router"
  return config
