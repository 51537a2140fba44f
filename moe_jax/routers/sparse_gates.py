"""Routers whose gates are exactly 0 for the experts a token does not use, so the number of experts
varies per token: ReMoE's ReLU gates (Wang et al. 2024) and DSelect-k's smooth-step selectors
(Hazimeh et al. 2021)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers.base import STATE, Router, RouterCost, batch_total, register
from moe_jax.routing import valid_tokens, load_balancing_loss, tokens_choose

__all__ = ["DSelectKRouter", "PositiveGateRouter", "ReMoeRouter", "l1_weight_update",
           "selector_weights", "smooth_step"]


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
  step's real tokens (before capacity; the whole batch's with micro-batches, routers.batch_total):
  lambda climbs from lambda_0 while the layer is denser than k experts per token (the paper's
  dense warm-up), then hovers where it holds k.

  lambda is the float32 variable 'l1_weight' of the router_state collection (state, never
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
    weight = self.variable(STATE, "l1_weight", jnp.full, (), self.init_l1_weight,
                           jnp.float32)
    routing = super().assign(probs, capacity=capacity, token_mask=token_mask,
                             deterministic=deterministic)
    l1 = weight.value * load_balancing_loss(probs, probs > 0, token_mask) / self.k
    positive = batch_total(self, "positive_gates", routing.tokens_per_expert.sum())
    real = batch_total(self, "tokens", valid_tokens(probs, token_mask).sum())
    if self.trains_state(deterministic):
      used = positive / jnp.maximum(real * self.num_experts, 1.0)
      weight.value = l1_weight_update(weight.value, 1 - used, 1 - self.k / self.num_experts,
                                      self.l1_weight_multiplier)
    return routing.replace(aux_loss=l1)


def smooth_step(t: jax.Array, gamma: float) -> jax.Array:
  """DSelect-k's smooth step, elementwise: 0 for t <= -gamma / 2, 1 for t >= gamma / 2, the cubic
  -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 between (continuously differentiable)."""
  cubic = -2 * t ** 3 / gamma ** 3 + 1.5 * t / gamma + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def selector_weights(z: jax.Array, gamma: float) -> jax.Array:
  """z [..., K, B] -> [..., K, E = 2^B]: selector i's weight on expert e, the product over bits b
  of S(z_ib) where bit b of e is 1 and 1 - S(z_ib) where it is 0 (S = smooth_step); each
  selector's weights sum to 1, and are one-hot once its B steps saturate."""
  num_bits = z.shape[-1]
  bits = (jnp.arange(2 ** num_bits)[:, None] >> jnp.arange(num_bits)) & 1  # [E,B]
  steps = smooth_step(z, gamma)[..., None, :]  # [..., K, 1, B]
  return jnp.prod(jnp.where(bits == 1, steps, 1 - steps), axis=-1)


def _symmetric_uniform(limit: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -limit,
                                                                  limit)


@register("dselect_k")
class DSelectKRouter(PositiveGateRouter):
  """DSelect-k (Hazimeh et al. 2021, NeurIPS), per-example gate: k selectors, selector i with
  log2(E) logits z_i = x W_z + b_z through the smooth step (selector_weights), mixed by
  softmax(x W_a + b_a) over the selectors: gates sum to 1. Once the steps saturate each selector
  is one-hot, so a token uses at most k experts; before that up to E, the ones its gates do not
  zero (PositiveGateRouter). aux_loss: the entropy regularizer, mean over tokens of sum_i
  H(selector i), H(r) = -sum_e r_e log(r_e + 1e-6) (the reference code's), pushing the selectors
  to saturate; the train config's aux_loss_weight weighs it (the configs keep 1e-2, near the
  reference code's default 1e-6 on a sum over a batch of the ViT's 6400 tokens). Init as the
  reference code: W_z, b_z ~ U(-gamma/100, gamma/100), W_a, b_a ~ U(-0.05, 0.05) (init_scale
  does not apply). E must be a power of two.

  Settings:
    gamma: width of the smooth step's cubic (the paper: 1).
  """
  default_k = 2
  learned = False  # no logits over experts: jitter and noise do not apply
  gamma: float = 1.0

  def check(self, layer):
    super().check(layer)
    experts = self.num_experts
    if experts < 2 or experts & (experts - 1):
      raise ValueError(f"MoeLayer.num_experts={experts} must be a power of two >= 2 for "
                       "router='dselect_k' (each selector picks an expert by log2(E) binary "
                       "smooth steps)")
    if self.gamma <= 0:
      raise self.setting_error("gamma", "must be > 0")

  def cost(self, layer, model_dim):
    outputs = self.k * (int(math.log2(self.num_experts)) + 1)  # z and the mix logits
    params = (model_dim + 1) * outputs
    return RouterCost(params, 2 * params + self.k * self.num_experts * math.log2(
        self.num_experts), layer.num_selected)

  @nn.compact
  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S] -> TokenChoices; no logits over experts (z-loss 0)."""
    del token_ids
    x = x.astype(jnp.float32)
    num_bits = int(math.log2(self.num_experts))
    dense = lambda features, limit, name: nn.Dense(
        features, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        kernel_init=_symmetric_uniform(limit), bias_init=_symmetric_uniform(limit))(x)
    z = dense(self.k * num_bits, self.gamma / 100, "selector_logits")
    selectors = selector_weights(z.reshape(*x.shape[:-1], self.k, num_bits), self.gamma)
    mix = jax.nn.softmax(dense(self.k, 0.05, "selector_mix"), axis=-1)  # [G,S,K]
    gates = jnp.einsum("gsk,gske->gse", mix, selectors)
    routing = self.assign(gates, capacity=capacity, token_mask=token_mask,
                          deterministic=deterministic)
    entropy = -jnp.sum(selectors * jnp.log(selectors + 1e-6), axis=(-2, -1))  # [G,S]
    valid = valid_tokens(gates, token_mask)
    return routing.replace(aux_loss=jnp.sum(entropy * valid) / jnp.maximum(valid.sum(), 1.0))
