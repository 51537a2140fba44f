"""Routing: who goes to which expert, and with what weight.

Einsum letters, used across moe-jax:
  G groups, S tokens per group, E experts, C capacity (slots per expert per group),
  K choices per token, M model width, H expert hidden width.

A routing decision with capacity is stored slot-major: for every (group, expert, slot) the token
that fills it (`slot_token`, S when the slot is empty) and its combine weight (`slot_gate`). That
form is O(G*E*C) and serves both capacity paths: the index path gathers with it directly, the
einsum path expands it into the dense [G,S,E,C] `dispatch`/`combine` tensors of GShard/Switch.
Tokens-choose routers also store it token-major (`choice_expert`, `choice_gate`, `choice_slot`,
[G,S,K]); without capacity (the dropless path) only the token-major form exists.

All routing math runs in float32 whatever the model's compute dtype (Switch Transformer: a bf16
router diverged). Formulas and defaults: ../shared/ROUTING.md.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

SECOND_EXPERT_POLICIES = ("all", "random")


@struct.dataclass
class RoutingOutput:
  """Routing instructions for one MoE layer.

  Attributes:
    slot_token: [G,E,C] int32, index in its group of the token filling slot c of expert e; S for
      an empty slot. None without capacity (dropless).
    slot_gate: [G,E,C] float32 combine weight of that token for that expert; 0 for an empty slot.
      None without capacity.
    probs: [G,S,E] float32 router probabilities.
    tokens_per_expert: [G,E] float32 choices the router made for each expert before capacity
      (and before GShard's random second-expert policy); padding tokens excluded.
    kept_per_expert: [G,E] float32 choices that got a slot.
    aux_loss: [] float32 load-balancing loss (0 for routers that need none).
    z_loss: [] float32 router z-loss (set by the router modules, which see the logits).
    choice_expert: [G,S,K] int32 expert of each choice of each token; E for a choice that is not
      processed (padding, a removed GShard 2nd choice, or dropped by capacity). None for expert
      choice.
    choice_gate: [G,S,K] float32 combine weight of each choice; 0 where choice_expert is E.
    choice_slot: [G,S,K] int32 flat slot e * C + c of each choice; E * C where not processed.
      None without capacity and for expert choice.
  """
  slot_token: Optional[Array]
  slot_gate: Optional[Array]
  probs: Array
  tokens_per_expert: Array
  kept_per_expert: Array
  aux_loss: Array
  z_loss: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  choice_expert: Optional[Array] = None
  choice_gate: Optional[Array] = None
  choice_slot: Optional[Array] = None

  @property
  def dispatch(self) -> Array:
    """[G,S,E,C] bool: token s fills slot c of expert e."""
    group_size = self.probs.shape[1]
    tokens = jnp.arange(group_size, dtype=jnp.int32)[None, :, None, None]
    return self.slot_token[:, None, :, :] == tokens

  @property
  def combine(self) -> Array:
    """[G,S,E,C] float32: the dispatch mask weighted by the combine weights."""
    return jnp.where(self.dispatch, self.slot_gate[:, None, :, :], 0.0)


def expert_capacity(group_size: int, num_experts: int, k: int = 1,
                    capacity_factor: float = 1.0, min_capacity: int = 4) -> int:
  """Slots per expert per group: max(min_capacity, ceil(k * capacity_factor * S / E))."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
  return max(min_capacity, math.ceil(k * capacity_factor * group_size / num_experts))


def _valid_tokens(probs: Array, token_mask: Optional[Array]) -> Array:
  """[G,S] float32, 1 for real tokens and 0 for padding."""
  if token_mask is None:
    return jnp.ones(probs.shape[:-1], jnp.float32)
  return token_mask.astype(jnp.float32)


def load_balancing_loss(probs: Array, expert_mask: Array,
                        token_mask: Optional[Array] = None) -> Array:
  """Switch load-balancing loss E * sum_e f_e * P_e, averaged over groups.

  Args:
    probs: [G,S,E] (or [S,E]) router probabilities.
    expert_mask: same shape, 1 where the token's top-k holds expert e.
    token_mask: [G,S] (or [S]), 1 for real tokens; padding counts in neither f nor P.
  Returns:
    [] float32; equals k under uniform routing.
  """
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)[..., None]
  count = jnp.maximum(valid.sum(axis=-2), 1.0)
  fraction = (expert_mask.astype(jnp.float32) * valid).sum(axis=-2) / count
  mean_prob = (probs * valid).sum(axis=-2) / count
  num_experts = probs.shape[-1]
  return jnp.mean(num_experts * jnp.sum(fraction * mean_prob, axis=-1))


def router_z_loss(logits: Array, token_mask: Optional[Array] = None) -> Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2. logits: [..., E]."""
  logits = logits.astype(jnp.float32)
  squared = jax.nn.logsumexp(logits, axis=-1) ** 2
  valid = _valid_tokens(logits, token_mask)
  return jnp.sum(squared * valid) / jnp.maximum(valid.sum(), 1.0)


def importance_loss(probs: Array, token_mask: Optional[Array] = None) -> Array:
  """V-MoE importance loss: CV^2 of the per-expert summed probability over the batch.

  probs: [..., E]. Returns [] float32, 0 when every expert gets the same total probability.
  """
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)[..., None]
  importance = (probs * valid).reshape(-1, probs.shape[-1]).sum(axis=0)
  return jnp.var(importance) / jnp.maximum(jnp.mean(importance) ** 2, 1e-12)


def _fill_slots(expert_index: Array, slot_index: Array, gates: Array, kept: Array,
                num_experts: int, capacity: int):
  """Scatters token-major choices into the slot-major form.

  expert_index, slot_index, gates, kept: [G,S,K]. Returns slot_token [G,E,C], slot_gate [G,E,C].
  Dropped choices are aimed at slot C, out of bounds, and the scatter drops them.
  """
  num_groups, group_size, k = expert_index.shape
  group = jnp.broadcast_to(jnp.arange(num_groups)[:, None, None], expert_index.shape)
  token = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[None, :, None],
                           expert_index.shape)
  slot = jnp.where(kept, slot_index, capacity)
  slot_token = jnp.full((num_groups, num_experts, capacity), group_size, jnp.int32)
  slot_token = slot_token.at[group, expert_index, slot].set(token, mode="drop")
  slot_gate = jnp.zeros((num_groups, num_experts, capacity), jnp.float32)
  slot_gate = slot_gate.at[group, expert_index, slot].set(gates, mode="drop")
  return slot_token, slot_gate


def top_k_choices(probs: Array, *, k: int, renormalize: bool = False,
                  second_expert_policy: str = "all", rng: Optional[Array] = None,
                  token_mask: Optional[Array] = None):
  """Each token's top-k experts and combine weights, before any capacity.

  Args: see `tokens_choose`.
  Returns:
    expert_index [G,S,K] int32 (descending probability), gates [G,S,K] float32 (the router
    probabilities, divided by their top-k sum when `renormalize`), routed [G,S,K] bool (False for
    padding and removed 2nd choices), aux_loss [] (load_balancing_loss on the top-k choices) and
    tokens_per_expert [G,E] float32 (choices per expert before the 2nd-choice policy; padding
    excluded).
  """
  num_experts = probs.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
  if second_expert_policy not in SECOND_EXPERT_POLICIES:
    raise ValueError(f"second_expert_policy={second_expert_policy!r} is unknown; allowed: "
                     f"{', '.join(map(repr, SECOND_EXPERT_POLICIES))}")
  if second_expert_policy == "random" and (k != 2 or rng is None):
    raise ValueError("second_expert_policy='random' needs k=2 and an rng, "
                     f"got k={k}, rng={'set' if rng is not None else None}")
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)

  top_probs, expert_index = jax.lax.top_k(probs, k)  # [G,S,K]
  gates = top_probs
  if renormalize:
    gates = top_probs / jnp.maximum(top_probs.sum(axis=-1, keepdims=True), 1e-9)
  routed = jnp.broadcast_to(valid[..., None] > 0, expert_index.shape)
  choice_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G,S,K,E]
  tokens_per_expert = jnp.sum(choice_one_hot * routed[..., None], axis=(1, 2)).astype(jnp.float32)
  aux_loss = load_balancing_loss(probs, choice_one_hot.max(axis=2), token_mask)

  if second_expert_policy == "random":
    second_share = top_probs[..., 1] / jnp.maximum(top_probs[..., 0] + top_probs[..., 1], 1e-9)
    keep_second = 2.0 * second_share > jax.random.uniform(rng, second_share.shape)
    routed = routed.at[..., 1].set(routed[..., 1] & keep_second)
  return expert_index.astype(jnp.int32), gates, routed, aux_loss, tokens_per_expert


def tokens_choose(probs: Array, *, k: int, capacity: Optional[int],
                  batch_prioritized: bool = False, renormalize: bool = False,
                  second_expert_policy: str = "all", rng: Optional[Array] = None,
                  token_mask: Optional[Array] = None) -> RoutingOutput:
  """Each token picks its top-k experts; experts keep the first `capacity` choices they get.

  Priority is k-major: every token's 1st choice claims a slot before any 2nd choice. Within a
  rank, tokens go in group order, or by descending top-1 probability when `batch_prioritized`
  (V-MoE). The combine weight is the router probability of the expert, divided by the sum of the
  token's top-k probabilities when `renormalize` (before any dropping).

  Args:
    probs: [G,S,E] router probabilities.
    k: choices per token, 1 <= k <= E.
    capacity: C, slots per expert per group; None keeps every choice (dropless: no slots, only
      the token-major choice_* fields).
    batch_prioritized: order tokens by descending top-1 probability instead of position.
    renormalize: divide the gates by the token's top-k probability sum (GShard, Mixtral).
    second_expert_policy: "all" keeps every 2nd choice; "random" (GShard, k=2 only) keeps it
      when 2 * g2 / (g1 + g2) > u, u ~ U[0, 1) drawn from `rng`. A removed 2nd choice takes no
      slot.
    rng: PRNG key, needed by second_expert_policy="random".
    token_mask: [G,S], 1 for real tokens; padding is never routed and never takes a slot.
  Returns:
    RoutingOutput with C = capacity and aux_loss = load_balancing_loss on the top-k choices.
  """
  num_groups, group_size, num_experts = probs.shape
  expert_index, gates, routed, aux_loss, tokens_per_expert = top_k_choices(
      probs, k=k, renormalize=renormalize, second_expert_policy=second_expert_policy, rng=rng,
      token_mask=token_mask)
  probs = probs.astype(jnp.float32)
  choice_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G,S,K,E]
  if capacity is None:
    kept_per_expert = jnp.sum(choice_one_hot * routed[..., None], axis=(1, 2))
    return RoutingOutput(slot_token=None, slot_gate=None, probs=probs,
                         tokens_per_expert=tokens_per_expert,
                         kept_per_expert=kept_per_expert.astype(jnp.float32), aux_loss=aux_loss,
                         choice_expert=jnp.where(routed, expert_index, num_experts),
                         choice_gate=jnp.where(routed, gates, 0.0))

  # Position of each choice in its expert's queue: a cumulative count in priority order.
  requests = choice_one_hot * routed[..., None]  # [G,S,K,E]
  if batch_prioritized:
    order = jnp.argsort(-probs.max(axis=-1), axis=1, stable=True)  # [G,S] priority -> token
    requests = jnp.take_along_axis(requests, order[:, :, None, None], axis=1)
  queue = jnp.swapaxes(requests, 1, 2).reshape(num_groups, k * group_size, num_experts)
  position = jnp.cumsum(queue, axis=1) * queue  # 1-based where requested
  slot_index = position.sum(axis=-1).reshape(num_groups, k, group_size).swapaxes(1, 2) - 1
  if batch_prioritized:
    slot_index = jnp.take_along_axis(slot_index, jnp.argsort(order, axis=1)[:, :, None], axis=1)
  kept = routed & (slot_index < capacity)

  slot_token, slot_gate = _fill_slots(expert_index, slot_index, gates, kept, num_experts,
                                      capacity)
  kept_per_expert = jnp.sum(choice_one_hot * kept[..., None], axis=(1, 2)).astype(jnp.float32)
  choice_slot = jnp.where(kept, expert_index * capacity + slot_index, num_experts * capacity)
  return RoutingOutput(slot_token=slot_token, slot_gate=slot_gate, probs=probs,
                       tokens_per_expert=tokens_per_expert, kept_per_expert=kept_per_expert,
                       aux_loss=aux_loss, choice_expert=jnp.where(kept, expert_index, num_experts),
                       choice_gate=jnp.where(kept, gates, 0.0),
                       choice_slot=choice_slot.astype(jnp.int32))


def experts_choose(probs: Array, *, capacity: int,
                   token_mask: Optional[Array] = None) -> RoutingOutput:
  """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens of the group.

  Reads every token of the group, so it is not causal. Combine weight = router probability.

  Args:
    probs: [G,S,E] router probabilities.
    capacity: C <= S tokens per expert.
    token_mask: [G,S], 1 for real tokens; an expert never takes padding (a slot it would fill with
      padding, when the group has fewer than C real tokens, stays empty).
  Returns:
    RoutingOutput; aux_loss is 0 (balanced by construction).
  """
  num_groups, group_size, num_experts = probs.shape
  if not 1 <= capacity <= group_size:
    raise ValueError(f"capacity={capacity} must be in [1, group_size={group_size}] "
                     "for expert choice")
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)
  # Probabilities are >= 0, so padding scored -1 is chosen only after every real token.
  scores = jnp.where(valid[..., None] > 0, probs, -1.0)
  gate, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G,E,C]
  taken = gate >= 0
  slot_token = jnp.where(taken, token, group_size).astype(jnp.int32)
  slot_gate = jnp.where(taken, gate, 0.0)
  kept_per_expert = taken.sum(axis=-1).astype(jnp.float32)
  return RoutingOutput(slot_token=slot_token, slot_gate=slot_gate, probs=probs,
                       tokens_per_expert=kept_per_expert, kept_per_expert=kept_per_expert,
                       aux_loss=jnp.zeros((), jnp.float32))


# ----------------------------------------------------------------------------------------------
# Router modules: a base that computes float32 logits, probabilities and the z-loss; subclasses
# turn the probabilities into slot assignments.


class Router(nn.Module):
  """Base router: x [G,S,M] -> RoutingOutput; capacity None: no capacity (tokens-choose only).

  Attributes:
    num_experts: E.
    init_scale: variance scale of the truncated-normal router kernel over fan-in; 0.1 is Switch's
      init (std sqrt(0.1 / M)).
    jitter_eps: multiplicative input jitter U(1 - eps, 1 + eps) in training (Switch: 1e-2).
    noise_std: std of Gaussian noise added to the logits in training (V-MoE: 1 / E).
    batch_prioritized: tokens-choose routers fill slots by descending top-1 probability.
  Jitter and noise apply only when not deterministic and draw from the 'routing' rng stream.
  """
  num_experts: int
  init_scale: float = 0.1
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  batch_prioritized: bool = False

  @nn.compact
  def __call__(self, x: Array, *, capacity: Optional[int],
               token_mask: Optional[Array] = None,
               deterministic: bool = False) -> RoutingOutput:
    x = x.astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("routing"), x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    kernel_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, kernel_init=kernel_init, name="logits")(x)
    if self.noise_std > 0 and not deterministic:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("routing"),
                                                           logits.shape)
    self.sow("intermediates", "router_logits", logits)  # recorded only when asked for (analysis)
    probs = jax.nn.softmax(logits, axis=-1)
    routing = self.assign(probs, capacity=capacity, token_mask=token_mask,
                          deterministic=deterministic)
    return routing.replace(z_loss=router_z_loss(logits, token_mask))

  def assign(self, probs: Array, *, capacity: int, token_mask: Optional[Array],
             deterministic: bool) -> RoutingOutput:
    raise NotImplementedError


class TokensChooseRouter(Router):
  """Each token picks its top-k experts (see `tokens_choose`).

  In deterministic mode the 'random' second-expert policy keeps every 2nd choice, so evaluation
  needs no rng.
  """
  k: int = 1
  renormalize: bool = False
  second_expert_policy: str = "all"

  def assign(self, probs, *, capacity, token_mask, deterministic):
    policy = "all" if deterministic else self.second_expert_policy
    rng = self.make_rng("routing") if policy == "random" else None
    return tokens_choose(probs, k=self.k, capacity=capacity,
                         batch_prioritized=self.batch_prioritized, renormalize=self.renormalize,
                         second_expert_policy=policy, rng=rng, token_mask=token_mask)


class SwitchRouter(TokensChooseRouter):
  """Switch Transformer: top-1, output scaled by the router probability p_e."""
  k: int = 1


class GShardRouter(TokensChooseRouter):
  """GShard top-2: gates renormalized by g1 + g2, 2nd expert kept with probability min(1, 2 g2)."""
  k: int = 2
  renormalize: bool = True
  second_expert_policy: str = "random"


class TopKRouter(TokensChooseRouter):
  """Mixtral top-k: softmax over the top-k logits, i.e. renormalized top-k probabilities."""
  k: int = 2
  renormalize: bool = True


class ExpertChoiceRouter(Router):
  """Expert choice: each expert takes its top-C tokens. Not causal."""

  def assign(self, probs, *, capacity, token_mask, deterministic):
    return experts_choose(probs, capacity=capacity, token_mask=token_mask)
