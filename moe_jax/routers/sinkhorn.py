"""S-BASE (Clark et al. 2022): top-1 of a Sinkhorn-balanced plan in training, of the logits in
evaluation."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers.base import Router, register
from moe_jax.routing import sigmoid_gated_top1

__all__ = ["SBaseRouter", "sinkhorn_plan"]


def sinkhorn_plan(logits: jax.Array, token_mask: Optional[jax.Array] = None,
                  num_iters: int = 30) -> jax.Array:
  """Sinkhorn's balanced transport plan of each group: logits [G,S,E] -> plan [G,S,E].

  Scales exp(logits) by token and expert factors until every real token carries 1 / S_real and
  every expert 1 / E (the iterations of Megatron-Core's sinkhorn, a fixed number here);
  padding tokens carry nothing. No gradient flows through the plan.
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  valid = (jnp.ones(logits.shape[:2], jnp.float32) if token_mask is None
           else token_mask.astype(jnp.float32))
  cost = jnp.exp(logits - logits.max(axis=(1, 2), keepdims=True)) * valid[..., None]
  num_tokens = jnp.maximum(valid.sum(axis=1, keepdims=True), 1.0)  # [G,1]
  num_experts = logits.shape[-1]

  def scale(_, factors):
    token_factor, expert_factor = factors  # [G,S], [G,E]
    token_factor = valid / num_tokens / jnp.maximum(
        jnp.einsum("gse,ge->gs", cost, expert_factor), 1e-30)
    expert_factor = (1.0 / num_experts) / jnp.maximum(
        jnp.einsum("gse,gs->ge", cost, token_factor), 1e-30)
    return token_factor, expert_factor

  start = (jnp.ones(logits.shape[:2], jnp.float32),
           jnp.ones((logits.shape[0], num_experts), jnp.float32))
  token_factor, expert_factor = jax.lax.fori_loop(0, num_iters, scale, start)
  return cost * token_factor[..., None] * expert_factor[:, None, :]


@register("sbase")
class SBaseRouter(Router):
  """S-BASE: in training each token goes to the argmax of its row of the Sinkhorn plan of its
  group's logits (close to balanced, unlike BASE's exact assignment, and far cheaper); in
  evaluation to the argmax of its logits. The gate is sigmoid(logit of the chosen expert), as
  Megatron-Core's sinkhorn balancing for top-1; no auxiliary loss. The training choice reads the
  whole group: not causal.

  Settings:
    sinkhorn_iters: Sinkhorn iterations per training step.
  """
  fixed_k = True
  causal_safe = False
  sinkhorn_iters: int = 30

  def check(self, layer):
    super().check(layer)
    if self.sinkhorn_iters < 1:
      raise self.setting_error("sinkhorn_iters", "must be >= 1")

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    del clean_logits
    plan = logits if deterministic else sinkhorn_plan(logits, token_mask, self.sinkhorn_iters)
    return sigmoid_gated_top1(logits, jnp.argmax(plan, axis=-1), capacity=capacity,
                              token_mask=token_mask)
