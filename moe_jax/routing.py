"""Routing: who goes to which expert, and with what weight.

Einsum letters, used across moe-jax:
  G groups, S tokens per group, E experts, C capacity (slots per expert per group),
  K choices per token, M model width, H expert hidden width; the dropless path's rows sorted by
  expert are R, and its blocks form splits them into blocks b of B rows r.

A routing decision with capacity is stored slot-major: for every (group, expert, slot) the token
that fills it (`slot_token`, S when the slot is empty) and its combine weight (`slot_gate`). That
form is O(G*E*C) and serves both capacity paths: the index path gathers with it directly, the
einsum path expands it into the dense [G,S,E,C] `dispatch`/`combine` tensors of GShard/Switch.
Tokens-choose routers also store it token-major (`choice_expert`, `choice_gate`, `choice_slot`,
[G,S,K]); without capacity (the dropless path) only the token-major form exists.

All routing math runs in float32 whatever the model's compute dtype (Switch Transformer: a bf16
router diverged). Formulas and defaults: docs/ROUTING.md.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

SECOND_EXPERT_POLICIES = ("all", "random")
ROUTER_SCORES = ("softmax", "sigmoid")


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
    max_logit: [] float32 the largest router logit over real tokens and experts (what the z-loss
      bounds, ST-MoE); 0 for routers without logits.
    choice_expert: [G,S,K] int32 expert of each choice of each token; E for a choice that is not
      processed (padding, a removed GShard 2nd choice, or dropped by capacity). None for expert
      choice and soft routing.
    choice_gate: [G,S,K] float32 combine weight of each choice; 0 where choice_expert is E.
    choice_slot: [G,S,K] int32 flat slot e * C + c of each choice; E * C where not processed.
      None without capacity, for expert choice and soft routing.
    dispatch_weights, combine_weights: [G,S,E,C] float32, soft routing only (Soft MoE), where
      every slot mixes all tokens and so has no single `slot_token` (those slots are empty).
    selected_expert: [G,S,K] int32 expert of each choice as the router made it, before capacity;
      E for padding and a removed GShard 2nd choice. None where choice_expert is None.
  """
  slot_token: Optional[Array]
  slot_gate: Optional[Array]
  probs: Array
  tokens_per_expert: Array
  kept_per_expert: Array
  aux_loss: Array
  z_loss: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  max_logit: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  choice_expert: Optional[Array] = None
  choice_gate: Optional[Array] = None
  choice_slot: Optional[Array] = None
  dispatch_weights: Optional[Array] = None
  combine_weights: Optional[Array] = None
  selected_expert: Optional[Array] = None

  @property
  def soft(self) -> bool:
    return self.dispatch_weights is not None

  def token_experts(self) -> Tuple[Array, Array]:
    """Each token's experts: (selected, processed), both [G,S,E] bool.

    selected: tokens-choose routers: the router's choices, before capacity; expert choice: the
    experts that took the token; soft routing, which has no choices: the expert with the
    largest combine weight. processed: the experts that ran on the token (soft: all of them).
    Padding tokens have neither.
    """
    num_experts = self.probs.shape[-1]
    if self.soft:
      real = jnp.broadcast_to(self.probs.sum(axis=-1, keepdims=True) > 0, self.probs.shape)
      top = jax.nn.one_hot(jnp.argmax(self.probs, axis=-1), num_experts, dtype=jnp.bool_)
      return top & real, real
    if self.choice_expert is None:  # expert choice: the slots say which experts took a token
      taken = self.dispatch.any(axis=-1)
      return taken, taken
    experts = lambda choices: jax.nn.one_hot(choices, num_experts, dtype=jnp.bool_).any(axis=2)
    return experts(self.selected_expert), experts(self.choice_expert)  # E: no expert

  @property
  def dispatch(self) -> Array:
    """[G,S,E,C] bool: token s fills slot c of expert e (soft routing: float32 weights)."""
    if self.soft:
      return self.dispatch_weights
    group_size = self.probs.shape[1]
    tokens = jnp.arange(group_size, dtype=jnp.int32)[None, :, None, None]
    return self.slot_token[:, None, :, :] == tokens

  @property
  def combine(self) -> Array:
    """[G,S,E,C] float32: the dispatch mask weighted by the combine weights."""
    if self.soft:
      return self.combine_weights
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


def _mean_over_real_groups(per_group: Array, valid: Array) -> Array:
  """per_group [G] losses, valid [G,S] -> [] their mean over the groups holding a real token:
  a group of padding alone (padding examples at the end of a batch) counts for nothing."""
  has_real = (valid.sum(axis=-1) > 0).astype(jnp.float32)
  return jnp.sum(per_group * has_real) / jnp.maximum(has_real.sum(), 1.0)


def load_balancing_loss(probs: Array, expert_mask: Array,
                        token_mask: Optional[Array] = None) -> Array:
  """Switch load-balancing loss E * sum_e f_e * P_e, averaged over the groups with a real token.

  Args:
    probs: [G,S,E] (or [S,E]) router probabilities.
    expert_mask: same shape, 1 where the token's top-k holds expert e.
    token_mask: [G,S] (or [S]), 1 for real tokens; padding counts in neither f nor P, and a
      group of padding alone not at all (so padding examples appended to a batch change nothing).
  Returns:
    [] float32; equals k under uniform routing.
  """
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)
  count = jnp.maximum(valid.sum(axis=-1), 1.0)[..., None]
  fraction = (expert_mask.astype(jnp.float32) * valid[..., None]).sum(axis=-2) / count
  mean_prob = (probs * valid[..., None]).sum(axis=-2) / count
  num_experts = probs.shape[-1]
  per_group = num_experts * jnp.sum(fraction * mean_prob, axis=-1)  # [G]
  return _mean_over_real_groups(per_group, valid)


def router_z_loss(logits: Array, token_mask: Optional[Array] = None) -> Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2. logits: [..., E]."""
  logits = logits.astype(jnp.float32)
  squared = jax.nn.logsumexp(logits, axis=-1) ** 2
  valid = _valid_tokens(logits, token_mask)
  return jnp.sum(squared * valid) / jnp.maximum(valid.sum(), 1.0)


def importance_loss(probs: Array, token_mask: Optional[Array] = None) -> Array:
  """V-MoE importance loss: per group, CV^2 of each expert's probability summed over the group's
  real tokens; averaged over the groups that hold one (vmoe computes it per group too).

  probs: [G,S,E] (or [S,E], one group), the clean softmax (V-MoE: before the logit noise).
  token_mask: [G,S] (or [S]). Returns [] float32, 0 when every expert gets the same total.
  """
  probs = probs.astype(jnp.float32)
  valid = _valid_tokens(probs, token_mask)
  importance = (probs * valid[..., None]).sum(axis=-2)  # [G,E]
  per_group = (jnp.var(importance, axis=-1)
               / jnp.maximum(jnp.mean(importance, axis=-1) ** 2, 1e-12))
  return _mean_over_real_groups(per_group, valid)


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
                  token_mask: Optional[Array] = None, selection_bias: Optional[Array] = None):
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

  if selection_bias is None:
    top_probs, expert_index = jax.lax.top_k(probs, k)  # [G,S,K]
  else:
    _, expert_index = jax.lax.top_k(probs + selection_bias.astype(jnp.float32), k)
    top_probs = jnp.take_along_axis(probs, expert_index, axis=-1)
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
                  token_mask: Optional[Array] = None,
                  selection_bias: Optional[Array] = None) -> RoutingOutput:
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
    selection_bias: [E] added to probs only to choose the top-k (loss-free balancing); the gates
      and batch priorities stay the unbiased probs.
  Returns:
    RoutingOutput with C = capacity and aux_loss = load_balancing_loss on the top-k choices.
  """
  num_groups, group_size, num_experts = probs.shape
  expert_index, gates, routed, aux_loss, tokens_per_expert = top_k_choices(
      probs, k=k, renormalize=renormalize, second_expert_policy=second_expert_policy, rng=rng,
      token_mask=token_mask, selection_bias=selection_bias)
  probs = probs.astype(jnp.float32)
  choice_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G,S,K,E]
  if capacity is None:
    kept_per_expert = jnp.sum(choice_one_hot * routed[..., None], axis=(1, 2))
    return RoutingOutput(slot_token=None, slot_gate=None, probs=probs,
                         tokens_per_expert=tokens_per_expert,
                         kept_per_expert=kept_per_expert.astype(jnp.float32), aux_loss=aux_loss,
                         choice_expert=jnp.where(routed, expert_index, num_experts),
                         choice_gate=jnp.where(routed, gates, 0.0),
                         selected_expert=jnp.where(routed, expert_index, num_experts))

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
                       choice_slot=choice_slot.astype(jnp.int32),
                       selected_expert=jnp.where(routed, expert_index, num_experts))


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


def load_loss(clean_logits: Array, noisy_logits: Array, *, k: int, noise_std: float,
              token_mask: Optional[Array] = None) -> Array:
  """V-MoE load loss (Riquelme et al. 2021, appendix): CV^2 of the experts' expected loads.

  threshold(x) = k-th largest noisy logit of x; p_e(x) = P(clean_e + fresh noise >= threshold)
  = 1 - Phi((threshold - clean_e) / noise_std); load_e = sum over tokens of p_e. Differentiable
  in the logits, unlike the counts of the choices.

  Args:
    clean_logits, noisy_logits: [G,S,E] router logits before and after the N(0, noise_std^2)
      noise.
    k: choices per token.
    noise_std: std of that noise, > 0.
    token_mask: [G,S], 1 for real tokens.
  Returns:
    [] float32, 0 when every expert has the same expected load.
  """
  clean_logits = clean_logits.astype(jnp.float32)
  threshold = jax.lax.top_k(noisy_logits.astype(jnp.float32), k)[0][..., -1:]  # [G,S,1]
  chosen = jax.scipy.special.ndtr((clean_logits - threshold) / noise_std)  # 1 - Phi(-z) = Phi(z)
  valid = _valid_tokens(clean_logits, token_mask)[..., None]
  load = (chosen * valid).reshape(-1, chosen.shape[-1]).sum(axis=0)
  return jnp.var(load) / jnp.maximum(jnp.mean(load) ** 2, 1e-12)


def assign_top1(expert_index: Array, gates: Array, num_experts: int, *, capacity: int,
                probs: Optional[Array] = None, token_mask: Optional[Array] = None
                ) -> RoutingOutput:
  """Routes every token to the one expert it was given, filling slots in token order.

  For routers whose choice is not the top-1 of a softmax (hash, random, BASE).

  Args:
    expert_index: [G,S] int expert of each token.
    gates: [G,S] float32 combine weight of each token.
    num_experts: E.
    capacity: C; later tokens beyond C for an expert are dropped. None: no capacity (dropless).
    probs: [G,S,E] router probabilities for the statistics; None: one-hot of expert_index (a
      router without probabilities is certain of its choice).
    token_mask: [G,S], 1 for real tokens.
  Returns:
    RoutingOutput; aux_loss is 0.
  """
  one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  routing = tokens_choose(one_hot, k=1, capacity=capacity, token_mask=token_mask)
  gates = gates.astype(jnp.float32)
  processed = routing.choice_expert < num_experts  # [G,S,1]
  routing = routing.replace(choice_gate=jnp.where(processed, gates[..., None], 0.0),
                            probs=one_hot if probs is None else probs,
                            aux_loss=jnp.zeros((), jnp.float32))
  if capacity is None:  # dropless: the token-major choices are all there is
    return routing
  gather = lambda gate, slots: gate.at[slots].get(mode="fill", fill_value=0.0)
  return routing.replace(slot_gate=jax.vmap(gather)(gates, routing.slot_token))  # empty: 0


def balanced_assignment(scores: Array, *, num_iters: int = 200,
                        final_temperature: float = 3e-3) -> Array:
  """BASE layers: each token to one expert, every expert exactly S/E tokens, high total score.

  Sinkhorn iterations solve the entropic transport problem (one unit per token, S/E per expert)
  while the temperature anneals geometrically from 1 to `final_temperature` (in units of the
  group's score std, so the result does not depend on the logits' scale); the warm-started
  potentials f_s, g_e then price popular experts. A greedy balanced rounding visits the
  (token, expert) pairs by descending adjusted score s + f_s + g_e (the order of the plan) and
  keeps a pair while the token is free and the expert has room, so the balance is exact whatever
  the convergence. Against scipy's linear_sum_assignment on Gaussian scores: optimal in 10 of 10
  groups of 12 tokens x 3 experts and 9 of 10 of 40 x 8; on 200 x 8 the total was within 1% of
  the optimum in 10 of 10 (about 25 ms for those 10 groups on 2 CPU cores).

  Args:
    scores: [G,S,E] token-expert affinities (no gradient flows through the assignment).
    num_iters: Sinkhorn iterations.
    final_temperature: entropic smoothing at the last iteration, relative to the score std.
  Returns:
    [G,S] int32 expert of each token.
  """
  num_groups, group_size, num_experts = scores.shape
  if group_size % num_experts:
    raise ValueError(f"balanced assignment needs the group size S={group_size} to be a "
                     f"multiple of num_experts={num_experts}")
  per_expert = group_size // num_experts
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  scores = scores / (jnp.std(scores, axis=(1, 2), keepdims=True) + 1e-9)

  def token_potential(expert_potential, temperature):  # [G,E] -> [G,S]: one unit per token
    return -temperature * jax.nn.logsumexp(
        (scores + expert_potential[:, None, :]) / temperature, axis=2)

  def sinkhorn(i, expert_potential):  # S/E units per expert
    temperature = final_temperature ** (i / max(num_iters - 1, 1))
    f = token_potential(expert_potential, temperature)
    return temperature * (math.log(per_expert)
                          - jax.nn.logsumexp((scores + f[..., None]) / temperature, axis=1))

  expert_potential = jax.lax.fori_loop(0, num_iters, sinkhorn,
                                       jnp.zeros((num_groups, num_experts), jnp.float32))
  adjusted = (scores + expert_potential[:, None, :]
              + token_potential(expert_potential, final_temperature)[..., None])
  order = jnp.argsort(-adjusted.reshape(num_groups, -1), axis=1)  # [G, S*E], pair = s * E + e

  def round_group(pairs):
    def visit(state, pair):
      expert_of, room = state
      token, expert = pair // num_experts, pair % num_experts
      take = (expert_of[token] < 0) & (room[expert] > 0)
      expert_of = expert_of.at[token].set(jnp.where(take, expert, expert_of[token]))
      return (expert_of, room.at[expert].add(-take.astype(jnp.int32))), None
    start = (jnp.full((group_size,), -1, jnp.int32),
             jnp.full((num_experts,), per_expert, jnp.int32))
    return jax.lax.scan(visit, start, pairs)[0][0]

  return jax.vmap(round_group)(order.astype(jnp.int32))


def hash_buckets(num_ids: int, num_experts: int, seed: int = 0) -> np.ndarray:
  """Hash layers: a fixed balanced hash of ids [0, num_ids) -> [num_ids] int32 expert.

  A fixed random permutation of the ids split into E consecutive buckets whose sizes differ by at
  most one (exactly num_ids / E when E divides num_ids). Static numpy: the same table every run.
  """
  permutation = np.random.default_rng(seed).permutation(num_ids)
  buckets = np.empty(num_ids, np.int32)
  buckets[permutation] = np.arange(num_ids) * num_experts // num_ids
  return buckets


# ----------------------------------------------------------------------------------------------
# Router modules: a base that computes float32 logits, probabilities and the z-loss; subclasses
# turn the probabilities into slot assignments (`assign`), or the logits when they need them
# (`route`: V-MoE's load loss, BASE's sigmoid gate). Two kinds replace the base's logits
# altogether: SoftMoeRouter (logits per slot, not per expert) and the FixedRouter subclasses
# (hash, random), which have no parameters.


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
               token_mask: Optional[Array] = None, token_ids: Optional[Array] = None,
               deterministic: bool = False) -> RoutingOutput:
    """x [G,S,M], token_mask [G,S], token_ids [G,S] (hash routing only) -> RoutingOutput."""
    del token_ids  # routers that read the inputs ignore the ids
    x = x.astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("routing"), x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    kernel_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    clean_logits = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                            param_dtype=jnp.float32, kernel_init=kernel_init, name="logits")(x)
    logits = clean_logits
    if self.noise_std > 0 and not deterministic:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("routing"),
                                                           logits.shape)
    self.sow("intermediates", "router_logits", logits)  # only where 'intermediates' is mutable
    routing = self.route(logits, clean_logits=clean_logits, capacity=capacity,
                         token_mask=token_mask, deterministic=deterministic)
    real = (jnp.ones(logits.shape[:-1], bool) if token_mask is None
            else token_mask.astype(bool))[..., None]
    return routing.replace(z_loss=router_z_loss(logits, token_mask),
                           max_logit=jnp.max(jnp.where(real, logits, -jnp.inf)))

  def score(self, logits: Array) -> Array:
    """[G,S,E] float32 logits -> the scores `assign` routes by (router probabilities)."""
    return jax.nn.softmax(logits, axis=-1)

  def route(self, logits: Array, *, clean_logits: Array, capacity: int,
            token_mask: Optional[Array], deterministic: bool) -> RoutingOutput:
    """logits [G,S,E] (after noise), clean_logits [G,S,E] (before) -> RoutingOutput.

    Default: `assign` on the scores of the logits. Routers that need the logits themselves
    (V-MoE's load loss, BASE's sigmoid gate) override this.
    """
    del clean_logits
    return self.assign(self.score(logits), capacity=capacity, token_mask=token_mask,
                       deterministic=deterministic)

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


class VMoeRouter(TokensChooseRouter):
  """V-MoE noisy top-k (Riquelme et al. 2021): top-k of softmax(x W + eps), eps ~ N(0, sigma^2).

  Gates are the (not renormalized) probabilities of the noisy softmax. aux_loss = importance
  loss of the clean softmax (as vmoe) + load loss (see `importance_loss`, `load_loss`); the paper
  weights each by 0.005 and sets sigma = 1 / E. Needs noise_std > 0: the load loss is a
  probability under that noise.
  """
  k: int = 2

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    routing = super().route(logits, clean_logits=clean_logits, capacity=capacity,
                            token_mask=token_mask, deterministic=deterministic)
    balance = (importance_loss(jax.nn.softmax(clean_logits, axis=-1), token_mask)
               + load_loss(clean_logits, logits, k=self.k, noise_std=self.noise_std,
                           token_mask=token_mask))
    return routing.replace(aux_loss=balance)


class BaseRouter(Router):
  """BASE layers (Lewis et al. 2021): balanced assignment in training, greedy top-1 in evaluation.

  Training: `balanced_assignment` of the logits (token-expert affinities x W), exactly S/E tokens
  per expert, so `capacity` must be at least S/E and nothing is dropped. Evaluation: each token to
  its argmax expert, slots in token order. The gate is sigmoid(affinity of the chosen expert),
  as in the paper; the assignment itself carries no gradient. Not causal in training.
  """

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    del clean_logits
    if deterministic:
      expert_index = jnp.argmax(logits, axis=-1)
    else:
      expert_index = balanced_assignment(logits)
    affinity = jnp.take_along_axis(logits, expert_index[..., None], axis=-1)[..., 0]
    return assign_top1(expert_index, jax.nn.sigmoid(affinity), self.num_experts,
                       capacity=capacity, probs=jax.nn.softmax(logits, axis=-1),
                       token_mask=token_mask)


class FixedRouter(Router):
  """Base of the routers without parameters: each token to one expert, gate 1, no losses.

  Subclasses choose the expert (`choose`); nothing is learned, so there is no router kernel,
  and the statistics see one-hot probabilities (entropy 0). jitter_eps, noise_std, init_scale
  and batch_prioritized do not apply.
  """

  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S], token_ids [G,S] -> RoutingOutput."""
    expert_index = self.choose(x.shape[:2], token_ids=token_ids, deterministic=deterministic)
    return assign_top1(expert_index, jnp.ones(x.shape[:2], jnp.float32), self.num_experts,
                       capacity=capacity, token_mask=token_mask)

  def choose(self, shape, *, token_ids, deterministic) -> Array:
    """[G,S] int expert of every token of a [G,S] shape."""
    raise NotImplementedError


class HashRouter(FixedRouter):
  """Hash layers (Roller et al. 2021): expert = hash_buckets(num_ids)[token id].

  Attributes:
    num_ids: the id range [0, num_ids) (LM: the vocabulary; ViT: patch positions with the class
      token), so that the fixed random table gives every expert an equal share of the ids.
  """
  num_ids: int = 0

  def choose(self, shape, *, token_ids, deterministic):
    del deterministic
    buckets = jnp.asarray(hash_buckets(self.num_ids, self.num_experts))
    return buckets[token_ids]


class RandomRouter(FixedRouter):
  """Random baseline: each token to a uniformly random expert, from the 'routing' rng in
  training and, in evaluation, from a fixed key of the layer's own (the same assignment every
  evaluation, independent between layers: a key shared by all layers would send a token to the
  same expert in every layer)."""

  def choose(self, shape, *, token_ids, deterministic):
    del token_ids
    if deterministic:  # the module path, e.g. block_1/moe/router, by a hash stable across runs
      layer = zlib.crc32("/".join(self.path).encode()) & 0x7FFFFFFF
      key = jax.random.fold_in(jax.random.key(0), layer)
    else:
      key = self.make_rng("routing")
    return jax.random.randint(key, shape, 0, self.num_experts)


class SoftMoeRouter(Router):
  """Soft MoE (Puigcerver et al. 2023): every slot is a weighted mix of all the group's tokens.

  logits[s, (e, c)] = scale * <x_s / |x_s|, phi_ec / |phi_ec|> for the E * C slots (C = the
  `capacity` given, the slots per expert), phi [M,E,C] learned and scale a learned scalar
  (init 1). Dispatch weights: softmax over the tokens of each slot; combine weights: softmax over
  the slots of each token. Nothing is dropped and there is no balancing or z-loss. Reads every
  token of the group: not causal. probs [G,S,E] for the statistics are each token's combine
  weight summed over an expert's slots; tokens_per_expert the sum of those over the tokens.
  """

  @nn.compact
  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S] -> RoutingOutput with [G,S,E,C] soft weights."""
    del token_ids, deterministic
    num_groups, group_size, model_dim = x.shape
    num_experts = self.num_experts
    phi = self.param("slots", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                     (model_dim, num_experts, capacity), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    normalize = lambda v, axis: v * jax.lax.rsqrt(jnp.sum(v * v, axis, keepdims=True) + 1e-6)
    logits = scale * jnp.einsum("gsm,mec->gsec", normalize(x.astype(jnp.float32), -1),
                                normalize(phi, 0))
    valid = _valid_tokens(logits[..., 0, 0], token_mask)
    real = valid[..., None, None] > 0
    # Padding takes part in neither softmax; a slot of an all-padding group gets zero weights.
    dispatch = jax.nn.softmax(jnp.where(real, logits, -1e30), axis=1) * real
    flat = logits.reshape(num_groups, group_size, num_experts * capacity)
    combine = jax.nn.softmax(flat, axis=-1).reshape(logits.shape) * valid[..., None, None]
    probs = combine.sum(axis=-1)  # [G,S,E]
    load = probs.sum(axis=1)
    return RoutingOutput(
        slot_token=jnp.full((num_groups, num_experts, capacity), group_size, jnp.int32),
        slot_gate=jnp.zeros((num_groups, num_experts, capacity), jnp.float32), probs=probs,
        tokens_per_expert=load, kept_per_expert=load, aux_loss=jnp.zeros((), jnp.float32),
        dispatch_weights=dispatch, combine_weights=combine)


def loss_free_bias_update(bias: Array, load: Array, rate: float) -> Array:
  """Loss-free balancing step: b_e += rate * sign(mean_e load_e - load_e), in float32.

  bias, load: [E] (load: choices per expert before capacity). Overloaded experts lose bias,
  underloaded ones gain it; an expert exactly at the mean keeps its bias.
  """
  load = jax.lax.stop_gradient(load.astype(jnp.float32))
  return bias.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load) - load)


class LossFreeRouter(TokensChooseRouter):
  """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): top-k of s + b, gates from s.

  b [E] float32 is the variable 'bias' of the 'router_bias' collection, not a parameter, so it
  is never differentiated (init leaves it at 0). When that collection is mutable and the call is
  neither deterministic nor init (a training step), b is replaced by `loss_free_bias_update` of
  this batch's load (all groups), and the next step routes with it. Scores s: softmax, or
  sigmoid (DeepSeek-V3), whose gates are then renormalized over the selected k. With sigmoid
  scores `probs` holds the sigmoid affinities, which do not sum to 1. No auxiliary loss:
  aux_loss is 0.
  """
  k: int = 2
  scores: str = "softmax"
  bias_update_rate: float = 1e-3

  def score(self, logits):
    if self.scores == "sigmoid":
      return jax.nn.sigmoid(logits)
    return super().score(logits)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    bias = self.variable("router_bias", "bias", jnp.zeros, (self.num_experts,), jnp.float32)
    routing = tokens_choose(probs, k=self.k, capacity=capacity,
                            batch_prioritized=self.batch_prioritized,
                            renormalize=self.scores == "sigmoid", token_mask=token_mask,
                            selection_bias=bias.value)
    # init makes every collection mutable; only a training call may move the bias
    if (not deterministic and self.is_mutable_collection("router_bias")
        and not self.is_initializing()):
      bias.value = loss_free_bias_update(bias.value, routing.tokens_per_expert.sum(axis=0),
                                         self.bias_update_rate)
    return routing.replace(aux_loss=jnp.zeros((), jnp.float32))
