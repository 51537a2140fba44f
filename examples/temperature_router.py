"""A router of your own, in one file: top-k of softmax(logits / t) with a learned temperature t.

Registering it makes 'temperature' a router everywhere, with no edit to moe_jax/:
MoeLayer(router="temperature"), model.moe.router = "temperature" in a config with its settings
under model.moe.temperature, sweeps, their statistics and report, and the analysis functions.
configs/vit_temperature.py trains it:

  python -m experiments.train --config configs/vit_temperature.py --workdir runs/vit_temperature
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import routers


@routers.register("temperature")
class TemperatureRouter(routers.TokensChooseRouter):
  """Top-k of p = softmax(x W / t), t = exp(log_temperature) learned; gates are the top-k p
  renormalized. The base classes add the load-balancing loss on p, the z-loss on x W, capacity
  and the dropless path; the class attributes say the rest (k = 2 by default, causal-safe).

  Settings (model.moe.temperature.<name> in a config):
    init_temperature: t at initialization (> 0).
  """
  renormalize: bool = True
  init_temperature: float = 1.0

  def check(self, layer):
    super().check(layer)
    if self.init_temperature <= 0:
      raise self.setting_error("init_temperature", "must be > 0")

  def score(self, logits):
    """[G,S,E] logits -> softmax(logits / t)."""
    log_t = self.param("log_temperature", nn.initializers.constant(jnp.log(self.init_temperature)),
                       (), jnp.float32)
    return jax.nn.softmax(logits / jnp.exp(log_t), axis=-1)
