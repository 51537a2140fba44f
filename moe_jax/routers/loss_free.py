"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias, no aux loss."""
from __future__ import annotations

import jax.numpy as jnp

from moe_jax.routers.base import STATE, batch_total, register
from moe_jax.routers.top_k import TokensChooseRouter
from moe_jax.routing import loss_free_bias_update

__all__ = ["LossFreeRouter"]


@register("loss_free")
class LossFreeRouter(TokensChooseRouter):
  """Top-k of s + b, gates from s.

  b [E] float32 is the variable 'bias' of the router_state collection, not a parameter, so it is
  never differentiated (init leaves it at 0). When that collection is mutable and the call is
  neither deterministic nor init (a training step), b is replaced by `loss_free_bias_update` of
  this batch's load (all groups; with gradient accumulation, of every micro-batch:
  routers.batch_total), and the next step routes with it. No auxiliary loss: aux_loss
  is 0. Group-limited routing ranks the groups by s + b, as DeepSeek-V3.

  Settings (beyond TokensChooseRouter's):
    bias_update_rate: u in b += u * sign(mean load - load), per training step.
    renormalize_sigmoid: gates of scores other than softmax (DeepSeek-V3: sigmoid) divided by
      their top-k sum (DeepSeek-V3's paper, eq. 13; Megatron-Core for k > 1); False: the scores
      themselves, times scaling_factor (Hugging Face's norm_topk_prob=False; Megatron-Core for
      k = 1). Softmax gates follow `renormalize`.
  """
  bias_update_rate: float = 1e-3
  renormalize_sigmoid: bool = True

  def check(self, layer):
    super().check(layer)
    if self.bias_update_rate < 0:
      raise self.setting_error("bias_update_rate", "must be >= 0")
    if self.group_score_input != "scores":
      raise self.setting_error("group_score_input", "must be 'scores' for router='loss_free' "
                               "(its groups are ranked by the scores plus the bias)")
    if not self.renormalize_sigmoid and (self.score_function == "softmax" or self.renormalize):
      raise self.setting_error("renormalize_sigmoid", "applies to sigmoid and sqrtsoftplus "
                               "scores, with renormalize=False")

  def renormalizes(self):
    return self.renormalize if self.score_function == "softmax" else self.renormalize_sigmoid

  def assign(self, probs, *, capacity, token_mask, deterministic):
    bias = self.variable(STATE, "bias", jnp.zeros, (self.num_experts,), jnp.float32)
    routing = self.choose(probs, capacity=capacity, token_mask=token_mask, bias=bias.value)
    load = batch_total(self, "load", routing.tokens_per_expert.sum(axis=0))  # the step's batch
    if self.trains_state(deterministic):
      bias.value = loss_free_bias_update(bias.value, load, self.bias_update_rate)
    return routing.replace(aux_loss=jnp.zeros((), jnp.float32))
