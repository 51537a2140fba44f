"""BASE layers (Lewis et al. 2021): a balanced assignment in training, greedy top-1 in
evaluation."""
from __future__ import annotations

import jax.numpy as jnp

from moe_jax.routers.base import Router, register
from moe_jax.routing import balanced_assignment, sigmoid_gated_top1

__all__ = ["BaseRouter"]


@register("base")
class BaseRouter(Router):
  """Training: `balanced_assignment` of the logits (token-expert affinities x W), exactly S/E
  tokens per expert, so the capacity is S/E and nothing is dropped. Evaluation: each token to
  its argmax expert, slots in token order (the layer's eval capacity). The gate is
  sigmoid(affinity of the chosen expert), as in the paper; the assignment itself carries no
  gradient. Not causal in training. group_size must be a multiple of num_experts.
  """
  fixed_k = True
  causal_safe = False
  needs_group_size = True

  def check(self, layer):
    super().check(layer)
    if layer.group_size % self.num_experts:
      raise ValueError(f"MoeLayer.group_size={layer.group_size} must be a multiple of "
                       f"num_experts={self.num_experts} for router='base' (balanced assignment)")

  def capacity(self, layer, group_size, deterministic):
    if deterministic:
      return super().capacity(layer, group_size, deterministic)
    return group_size // self.num_experts

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    del clean_logits
    if deterministic:
      expert_index = jnp.argmax(logits, axis=-1)
    else:
      expert_index = balanced_assignment(logits)
    return sigmoid_gated_top1(logits, expert_index, capacity=capacity, token_mask=token_mask)
