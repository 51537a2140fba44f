"""X-MoE's cosine router (Chi et al. 2022): scores from a low-dimensional cosine similarity."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers.base import RouterCost, register
from moe_jax.routers.top_k import TokensChooseRouter

__all__ = ["CosineRouter"]

MIN_TEMPERATURE = 0.01  # the learned temperature is clipped here (logits at most 100)


@register("cosine")
class CosineRouter(TokensChooseRouter):
  """logits_e = cos(x W, w_e) / t: the token projected by W [M,D] to a low dimension D, scored
  against expert embeddings w_e [D] by cosine similarity (both L2-normalized), over a learned
  temperature t = max(exp(log_temperature), 0.01). Routing in D dimensions, rather than in the
  model width, is X-MoE's answer to representation collapse. Then the top-k of the softmax, as
  TokensChooseRouter (the paper: top-1).

  Settings:
    embedding_dim: D (the paper: 16).
    init_temperature: t at initialization (0.07, as the paper, after CLIP).
  """
  default_k = 1
  embedding_dim: int = 16
  init_temperature: float = 0.07

  def check(self, layer):
    super().check(layer)
    if self.embedding_dim < 1:
      raise self.setting_error("embedding_dim", "must be >= 1")
    if self.init_temperature < MIN_TEMPERATURE:
      raise self.setting_error("init_temperature", f"must be >= {MIN_TEMPERATURE}")

  def cost(self, layer, model_dim):
    params = model_dim * self.embedding_dim + self.embedding_dim * layer.num_experts + 1
    flops = 2 * model_dim * self.embedding_dim + 2 * self.embedding_dim * layer.num_experts
    return RouterCost(params, flops, layer.num_selected)

  def compute_logits(self, x):
    kernel_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    projected = nn.Dense(self.embedding_dim, use_bias=False, dtype=jnp.float32,
                         param_dtype=jnp.float32, kernel_init=kernel_init, name="projection")(x)
    embeddings = self.param("expert_embeddings", nn.initializers.orthogonal(),
                            (self.embedding_dim, self.num_experts), jnp.float32)
    log_temperature = self.param("log_temperature",
                                 nn.initializers.constant(jnp.log(self.init_temperature)), (),
                                 jnp.float32)
    normalize = lambda v, axis: v * jax.lax.rsqrt(jnp.sum(v * v, axis, keepdims=True) + 1e-12)
    cosine = normalize(projected, -1) @ normalize(embeddings, 0)
    return cosine / jnp.maximum(jnp.exp(log_temperature), MIN_TEMPERATURE)
