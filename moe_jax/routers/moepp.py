"""MoE++ (Jin et al. 2024, ICLR 2025): top-k over the E FFN experts and Z zero-computation experts,
with gating residuals between the MoE layers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.experts import ZeroComputationExperts
from moe_jax.routers.base import Router, RouterCost, Statistic, register
from moe_jax.routing import (ZeroComputeChoices, expert_capacity, load_balancing_loss,
                             top_k_choices, tokens_choose)

__all__ = ["MoePlusPlusRouter"]


@register("moepp")
class MoePlusPlusRouter(Router):
  """MoE++: logits over E FFN experts and Z = num_zero + num_copy + num_constant zero-computation
  experts (zero: 0; copy: x; constant: a1 x + a2 v, learned v and (a1, a2) = softmax(W_c x);
  experts.ZeroComputationExperts), each token's top-k of softmax over all E + Z, gates the top-k
  probabilities. The gating residual adds W_g times the previous MoE layer's logits to this
  layer's (carries_logits; the first MoE layer has none). Only the FFN choices take slots (the
  FFN choices of tokens_choose, in the order of their gates); the zero-computation ones are
  computed for every token from their gates and never dropped (routing.ZeroComputeChoices).

  Capacity, FLOP count: expected FFN choices per token k E / (E + Z), what uniform routing over
  all E + Z experts gives (the configs keep the experts of top-k's width, as the paper compares
  MoE++ with the MoE of the same FFN experts). The realized share of choices that went to
  zero-computation experts is the routing statistic zero_computation_share, the realized FFN
  experts per token experts_per_token (the realized expert FLOPs per token: experts_per_token x
  2 n M H).

  aux_loss: the heterogeneous load-balancing loss (E + Z) sum_i eta_i f_i P_i over all E + Z
  experts, eta_i = 1 for FFN experts and tau for zero-computation ones (the train config's
  aux_loss_weight is the paper's beta, 1e-2).

  Settings (the paper's defaults: E = 8 FFN experts with 1 zero, 1 copy, 2 constant, top-2):
    num_zero, num_copy, num_constant: the zero-computation experts of each kind (1, 1, 2).
    zero_balance_weight: tau (0.75), the balancing weight of the zero-computation experts.
    gating_residual: add W_g times the previous MoE layer's logits (True).
  """
  default_k = 2
  carries_logits = True
  statistics = (Statistic("zero_computation_share"),)
  num_zero: int = 1
  num_copy: int = 1
  num_constant: int = 2
  zero_balance_weight: float = 0.75
  gating_residual: bool = True

  @property
  def num_zero_computation(self) -> int:
    """Z."""
    return self.num_zero + self.num_copy + self.num_constant

  @property
  def num_logits(self):
    return self.num_experts + self.num_zero_computation

  def ffn_choices(self, layer) -> float:
    """Expected FFN choices per token: k E / (E + Z)."""
    return layer.num_selected * self.num_experts / self.num_logits

  def check(self, layer):
    super().check(layer)
    for field in ("num_zero", "num_copy", "num_constant"):
      if getattr(self, field) < 0:
        raise self.setting_error(field, "must be >= 0")
    if self.zero_balance_weight <= 0:
      raise self.setting_error("zero_balance_weight", "must be > 0")

  def capacity(self, layer, group_size, deterministic):
    factor = layer.eval_capacity_factor if deterministic else layer.capacity_factor
    return min(group_size, expert_capacity(group_size, self.num_experts, self.ffn_choices(layer),
                                           factor, layer.min_capacity))

  def cost(self, layer, model_dim):
    """Logits [M, E+Z], W_g [E+Z, E+Z]; per constant expert v [M] and W_c [M, 2]."""
    params = model_dim * self.num_logits + self.gating_residual * self.num_logits ** 2
    constants = self.num_constant * 3 * model_dim
    return RouterCost(params + constants, 2 * (params + constants), self.ffn_choices(layer))

  def carried_term(self, carried):
    """carried [G,S,E'] the previous MoE layer's logits -> [G,S,E+Z] W_g carried (0 without
    gating_residual)."""
    if not self.gating_residual:
      return jnp.zeros((), carried.dtype)
    return self.logits_kernel("gating_residual", carried.dtype)(carried)

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    del deterministic
    experts = self.num_experts
    probs = jax.nn.softmax(logits, axis=-1)  # [G,S,E+Z]
    index, gates, routed, _, _ = top_k_choices(probs, k=self.k, token_mask=token_mask)
    chosen = jax.nn.one_hot(index, probs.shape[-1], dtype=probs.dtype) * routed[..., None]
    chosen_gate = jnp.einsum("gske,gsk->gse", chosen, gates.astype(probs.dtype))  # [G,S,E+Z]
    routing = tokens_choose(chosen_gate[..., :experts], k=min(self.k, experts),
                            capacity=capacity, token_mask=token_mask, positive_only=True)
    eta = jnp.where(jnp.arange(probs.shape[-1]) < experts, 1.0, self.zero_balance_weight)
    aux_loss = load_balancing_loss(probs * eta, chosen.max(axis=2), token_mask)
    # The next layer's gating residual reads the logits before any training noise.
    return ZeroComputeChoices(**{name: getattr(routing, name) for name in (
        "tokens_per_expert", "kept_per_expert", "choice_expert", "choice_gate",
        "selected_expert", "slot_token", "slot_gate", "choice_slot")},
        probs=probs[..., :experts], aux_loss=aux_loss, zero_gate=chosen_gate[..., experts:],
        logits=clean_logits)

  @nn.nowrap
  def side_output(self, x, routing, dtype):
    """The zero-computation experts' output, from their gates (never dropped)."""
    return ZeroComputationExperts(self.num_zero, self.num_copy, self.num_constant, dtype=dtype,
                                  name="zero_computation_experts")(x, routing.zero_gate)

  def statistic_sums(self, routing, token_mask):
    """zero_computation_share: the choices of zero-computation experts over all choices, the
    FFN experts' requested before capacity."""
    zero = jnp.sum((routing.zero_gate > 0).sum(axis=-1) * token_mask.astype(jnp.float32))
    return {"zero_computation_share": (zero, zero + routing.tokens_per_expert.sum())}
