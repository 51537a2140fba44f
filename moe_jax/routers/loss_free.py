"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias, no aux loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.base import register
from moe_jax.routers.top_k import TokensChooseRouter
from moe_jax.routing import loss_free_bias_update, tokens_choose
from moe_jax.validation import check_choice

__all__ = ["LossFreeRouter", "SCORES"]

SCORES = ("softmax", "sigmoid")


@register("loss_free")
class LossFreeRouter(TokensChooseRouter):
  """Top-k of s + b, gates from s.

  b [E] float32 is the variable 'bias' of the 'router_bias' collection, not a parameter, so it
  is never differentiated (init leaves it at 0). When that collection is mutable and the call is
  neither deterministic nor init (a training step), b is replaced by `loss_free_bias_update` of
  this batch's load (all groups), and the next step routes with it. No auxiliary loss: aux_loss
  is 0.

  Settings:
    scores: 'softmax', or 'sigmoid' (DeepSeek-V3), whose gates are always renormalized over the
      selected k; with sigmoid scores `probs` holds the sigmoid affinities, which do not sum to 1.
    bias_update_rate: u in b += u * sign(mean load - load), per training step.
    renormalize: renormalize softmax gates over the selected k too.
  """
  scores: str = "softmax"
  bias_update_rate: float = 1e-3

  def check(self, layer):
    super().check(layer)
    check_choice("MoeLayer.loss_free", "scores", self.scores, SCORES)
    if self.bias_update_rate < 0:
      raise self.setting_error("bias_update_rate", "must be >= 0")

  def score(self, logits):
    if self.scores == "sigmoid":
      return jax.nn.sigmoid(logits)
    return super().score(logits)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    bias = self.variable("router_bias", "bias", jnp.zeros, (self.num_experts,), jnp.float32)
    routing = tokens_choose(probs, k=self.k, capacity=capacity,
                            batch_prioritized=self.batch_prioritized,
                            renormalize=self.renormalize or self.scores == "sigmoid",
                            token_mask=token_mask, selection_bias=bias.value)
    # init makes every collection mutable; only a training call may move the bias
    if (not deterministic and self.is_mutable_collection("router_bias")
        and not self.is_initializing()):
      bias.value = loss_free_bias_update(bias.value, routing.tokens_per_expert.sum(axis=0),
                                         self.bias_update_rate)
    return routing.replace(aux_loss=jnp.zeros((), jnp.float32))
