"""Soft MoE (Puigcerver et al. 2023): every slot is a weighted mix of all the group's tokens."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers.base import Router, RouterCost, register
from moe_jax.routing import SoftSlots, expert_capacity

__all__ = ["SoftMoeRouter"]


@register("soft")
class SoftMoeRouter(Router):
  """logits[s, (e, c)] = scale * <x_s / |x_s|, phi_ec / |phi_ec|> for the E * C slots (C = the
  `capacity` given, the slots per expert), phi [M,E,C] learned and scale a learned scalar
  (init 1). Dispatch weights: softmax over the tokens of each slot; combine weights: softmax over
  the slots of each token. Nothing is dropped and there is no balancing or z-loss. Reads every
  token of the group: not causal. probs [G,S,E] for the statistics are each token's combine
  weight summed over an expert's slots; tokens_per_expert the sum of those over the tokens.

  C = max(min_capacity, ceil(cf S / E)) with the configured group_size S (at most S), in
  training and evaluation alike, since the slot parameters have that shape; the mean slots per
  token is then E C / S (the paper: one slot per token, cf = 1). The einsum path only: its
  dense weights are the only way to dispatch.
  """
  default_k = None
  form = "soft"
  causal_safe = False
  learned = False  # no softmax over experts: jitter and logit noise do not apply
  needs_group_size = True  # the slot parameters are sized by it

  @classmethod
  def paper_config(cls, num_experts):
    del num_experts
    return {"model.moe.capacity_factor": 1.0, "model.moe.eval_capacity_factor": 1.0,
            "model.moe.dispatch_path": "einsum"}

  def capacity(self, layer, group_size, deterministic):
    del group_size, deterministic  # fixed by the slot parameters' shape
    return min(layer.group_size, expert_capacity(layer.group_size, layer.num_experts, 1,
                                                 layer.capacity_factor, layer.min_capacity))

  def cost(self, layer, model_dim):
    slots = layer.num_experts * self.capacity(layer, layer.group_size, deterministic=False)
    # Per token: its logits for every slot, its share of the slot inputs (dispatch) and its
    # output mixed from every slot (combine). Parameters: phi [M,E,C] and the scale.
    return RouterCost(params=model_dim * slots + 1, flops_per_token=3 * 2 * model_dim * slots,
                      experts_per_token=slots / layer.group_size)

  @nn.compact
  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S] -> SoftSlots with [G,S,E,C] weights."""
    del token_ids, deterministic
    num_groups, group_size, model_dim = x.shape
    num_experts = self.num_experts
    phi = self.param("slots", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                     (model_dim, num_experts, capacity), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    normalize = lambda v, axis: v * jax.lax.rsqrt(jnp.sum(v * v, axis, keepdims=True) + 1e-6)
    logits = scale * jnp.einsum("gsm,mec->gsec", normalize(x.astype(jnp.float32), -1),
                                normalize(phi, 0))
    valid = (jnp.ones((num_groups, group_size), jnp.float32) if token_mask is None
             else token_mask.astype(jnp.float32))
    real = valid[..., None, None] > 0
    # Padding takes part in neither softmax; a slot of an all-padding group gets zero weights.
    dispatch = jax.nn.softmax(jnp.where(real, logits, -1e30), axis=1) * real
    flat = logits.reshape(num_groups, group_size, num_experts * capacity)
    combine = jax.nn.softmax(flat, axis=-1).reshape(logits.shape) * valid[..., None, None]
    probs = combine.sum(axis=-1)  # [G,S,E]
    load = probs.sum(axis=1)
    return SoftSlots(probs=probs, tokens_per_expert=load, kept_per_expert=load,
                     aux_loss=jnp.zeros((), jnp.float32), dispatch_weights=dispatch,
                     combine_weights=combine)
