"""SMEAR (Muqeeth et al. 2023, TMLR 2024): soft merging of experts with adaptive routing."""
from __future__ import annotations

import jax.numpy as jnp

from moe_jax.dispatch import expert_matrices
from moe_jax.metrics import entropy
from moe_jax.routers.base import Router, RouterCost, Statistic, register
from moe_jax.routing import experts_merge

__all__ = ["SmearRouter"]


@register("smear")
class SmearRouter(Router):
  """p = softmax(x W) per token; a group's merge weights are the mean of p over its real tokens
  (the paper averages over an example: the configs make a group one example), and its tokens
  run through one FFN whose kernels are sum_e w_e W_e (routing.MergeWeights on the 'merge'
  dispatch path; experts.FeedForward). Every expert's parameters enter every token's output,
  nothing is dropped, no balancing loss (the paper uses none); the z-loss applies as usual.
  Averaging reads later tokens of the group: not causal. The statistic merge_entropy is the mean
  over the groups with a real token of the entropy of their merge weights, in nats (ln E: every
  expert weighted equally; 0: one expert).

  Cost: one FFN per token plus the merge, E x (one expert's parameters) multiply-adds per group;
  the configs give the experts the dense FFN's width (equal_flops_experts = 1), so the active
  FLOPs are dense's plus the router and the merge.
  """
  default_k = None
  form = "merge"
  causal_safe = False
  needs_group_size = True  # the group is the unit the weights average over
  equal_flops_experts = 1.0
  statistics = (Statistic("merge_entropy"),)

  @classmethod
  def paper_config(cls, num_experts):
    del num_experts
    return {"model.moe.dispatch_path": "merge"}

  def cost(self, layer, model_dim):
    """The logits (kernel [M,E]) and the merge: per group E expert kernels summed into one,
    E n M H multiply-adds, i.e. 2 E n M H / S FLOPs per token; one merged FFN per token."""
    params = model_dim * layer.num_experts
    expert = expert_matrices(layer.activation) * model_dim * layer.expert_hidden_dim
    merge = 2 * layer.num_experts * expert / layer.group_size
    return RouterCost(params, 2 * params + merge, 1)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    del capacity, deterministic  # no slots; the same weights in training and evaluation
    return experts_merge(probs, token_mask)

  def statistic_sums(self, routing, token_mask):
    """merge_entropy: H(merge weights [G,E]) summed over the groups with a real token, over
    those groups."""
    has_real = token_mask.astype(bool).any(axis=-1).astype(jnp.float32)  # [G]
    return {"merge_entropy": (jnp.sum(entropy(routing.merge_weights) * has_real),
                              has_real.sum())}
