"""Forced balance for speed studies: a fixed assignment at a load the study chooses."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moe_jax.routers.base import Router, RouterCost, register
from moe_jax.routing import tokens_choose

__all__ = ["ForcedRouter"]


@register("forced")
class ForcedRouter(Router):
  """Forced balance for speed studies (Megatron's moe_router_force_load_balancing): nothing is
  learned; token s of a group takes the k experts q_s, q_s + 1, ..., q_s + k - 1 (mod E), where
  q_s splits the group's positions by the shares p_e proportional to (e + 1)^-skew. skew = 0 is
  exact balance (S k / E choices per expert when E divides S); a larger skew loads the first
  experts, as a collapsing router does, at a load the study controls. Gates 1 / k; no losses.

  Settings:
    skew: the exponent of the shares (>= 0).
  """
  learned = False
  in_zoo = False  # a tool for speed studies, not a routing idea
  skew: float = 0.0

  def check(self, layer):
    super().check(layer)
    if self.skew < 0:
      raise self.setting_error("skew", "must be >= 0")

  def cost(self, layer, model_dim):
    del model_dim
    return RouterCost(params=0, flops_per_token=0, experts_per_token=layer.num_selected)

  def first_experts(self, group_size: int) -> np.ndarray:
    """[S] int q_s: position s / S placed in the cumulative shares of the experts."""
    shares = (np.arange(self.num_experts) + 1.0) ** -self.skew
    edges = np.cumsum(shares / shares.sum())
    return np.minimum(np.searchsorted(edges, (np.arange(group_size) + 0.5) / group_size),
                      self.num_experts - 1)

  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S] -> TokenChoices with the forced choices."""
    del token_ids, deterministic
    num_groups, group_size, _ = x.shape
    experts = (self.first_experts(group_size)[:, None] + np.arange(self.k)) % self.num_experts
    chosen = np.zeros((group_size, self.num_experts), np.float32)
    np.put_along_axis(chosen, experts, 1.0 / self.k, axis=-1)  # equal scores: gates 1 / k
    probs = jnp.broadcast_to(jnp.asarray(chosen), (num_groups, group_size, self.num_experts))
    routing = tokens_choose(probs, k=self.k, capacity=capacity, token_mask=token_mask)
    return routing.replace(aux_loss=jnp.zeros((), jnp.float32))
