"""Routers whose gates are exactly 0 for the experts a token does not use, so the number of experts
varies per token: ReMoE's ReLU gates (Wang et al. 2024)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.base import Router, register
from moe_jax.routing import _valid_tokens, load_balancing_loss, tokens_choose

__all__ = ["PositiveGateRouter", "ReMoeRouter", "l1_weight_update"]


class PositiveGateRouter(Router):
  """A token goes to every expert whose gate is above 0, the gate its combine weight: the choices
  of tokens_choose with K = E in descending gate order (positive_only), so capacity drops a
  token's smallest gates first. k is not a per-token limit but the experts per token that the
  capacity, the FLOP count and the configs' expert width are sized for (MoeLayer.k); the routing
  statistic experts_per_token gives the realized mean. Subclasses set the auxiliary loss.
  """

  def assign(self, probs, *, capacity, token_mask, deterministic):
    return tokens_choose(probs, k=self.num_experts, capacity=capacity, token_mask=token_mask,
                         positive_only=True)


def l1_weight_update(weight: jax.Array, sparsity: jax.Array, target: float,
                     multiplier: float) -> jax.Array:
  """ReMoE's step: lambda * multiplier^sign(target - sparsity), in float32 (weight, sparsity
  []): the L1 weight grows while the gates are denser than the target, shrinks while sparser."""
  sparsity = jax.lax.stop_gradient(sparsity.astype(jnp.float32))
  return weight.astype(jnp.float32) * multiplier ** jnp.sign(target - sparsity)


@register("remoe")
class ReMoeRouter(PositiveGateRouter):
  """ReMoE (Wang et al. 2024, ICLR 2025): gates ReLU(x W), no softmax and no top-k; every expert
  with a positive gate processes the token (PositiveGateRouter). The sparsity is held by an L1
  penalty with the paper's load-balancing refinement, aux_loss = lambda * (1 / T) sum_t sum_e
  f_e g_te, f_e = E / (k T) (tokens with g_te > 0): the Switch loss of the gates over k (per
  group), as the paper's Megatron code computes it. After each training step lambda *=
  alpha^sign(target - sparsity), target 1 - k / E, sparsity the share of zero gates of the
  step's real tokens (before capacity): lambda climbs from lambda_0 while the layer is denser
  than k experts per token (the paper's dense warm-up), then hovers where it holds k.

  lambda is the float32 variable 'l1_weight' of the 'router_bias' collection (state, never
  differentiated, checkpointed; as loss_free's bias), one per layer where the paper shares one
  over the layers; only a training call with the collection mutable moves it. The train config's
  aux_loss_weight multiplies aux_loss: the configs set it to 1 (paper_config), so lambda is the
  whole coefficient.

  Settings:
    init_l1_weight: lambda_0 (the paper: 1e-8).
    l1_weight_multiplier: alpha (the paper: 1.2).
  """
  default_k = 1
  init_l1_weight: float = 1e-8
  l1_weight_multiplier: float = 1.2

  @classmethod
  def paper_config(cls, num_experts):
    del num_experts
    return {"train.aux_loss_weight": 1.0}

  def check(self, layer):
    super().check(layer)
    if self.init_l1_weight <= 0:
      raise self.setting_error("init_l1_weight", "must be > 0")
    if self.l1_weight_multiplier < 1:
      raise self.setting_error("l1_weight_multiplier", "must be >= 1")

  def score(self, logits):
    return jax.nn.relu(logits)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    weight = self.variable("router_bias", "l1_weight", jnp.full, (), self.init_l1_weight,
                           jnp.float32)
    routing = super().assign(probs, capacity=capacity, token_mask=token_mask,
                             deterministic=deterministic)
    l1 = weight.value * load_balancing_loss(probs, probs > 0, token_mask) / self.k
    # init makes every collection mutable; only a training call may move lambda
    if (not deterministic and self.is_mutable_collection("router_bias")
        and not self.is_initializing()):
      real = _valid_tokens(probs, token_mask).sum()
      used = routing.tokens_per_expert.sum() / jnp.maximum(real * self.num_experts, 1.0)
      weight.value = l1_weight_update(weight.value, 1 - used, 1 - self.k / self.num_experts,
                                      self.l1_weight_multiplier)
    return routing.replace(aux_loss=l1)
