"""Routing: who goes to which expert, and with what weight.

Einsum letters, used across moe-jax:
  G groups, S tokens per group, E experts, C capacity (slots per expert per group),
  K choices per token, M model width, H expert hidden width; the dropless path's rows sorted by
  expert are R, and its blocks form splits them into blocks b of B rows r.

A routing decision takes one of four forms (FORMS), each its own type, and each dispatch path
(dispatch.py) states the forms it takes:
  choices  TokenChoices: each token's K experts and gates, token-major ([G,S,K]); with capacity
           also slot-major: for every (group, expert, slot) the token that fills it (S when
           empty) and its gate ([G,E,C], O(G*E*C)). The index path gathers with the slot-major
           form, the einsum path expands it into GShard's dense [G,S,E,C] masks, the dropless
           path (no capacity) sorts the token-major choices.
  slots    ExpertSlots: expert choice; the slot-major form alone (a token fills any number of
           slots).
  soft     SoftSlots: Soft MoE; every slot mixes all tokens, dense [G,S,E,C] weights (einsum).
  merge    MergeWeights: SMEAR; per group, weights [G,E] that average the experts' parameters
           into one FFN that every token of the group runs through (the merge path).

All routing math runs in float32 whatever the model's compute dtype (Switch Transformer: a bf16
router diverged). Formulas and defaults: docs/ROUTING.md.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

__all__ = ["DROP_POLICIES", "DROP_RANKS", "ExpertSlots", "FORMS", "MergeWeights", "PRIORITIES",
           "RoutingOutput", "SECOND_EXPERT_POLICIES", "SoftSlots", "TokenChoices",
           "ZeroComputeChoices", "assign_top1", "balanced_assignment", "expert_capacity",
           "experts_choose", "experts_merge", "group_limit_bias", "hash_buckets",
           "importance_loss", "load_balancing_loss", "load_loss", "loss_free_bias_update",
           "mean_over_real_groups", "router_z_loss", "segment_balancing_loss",
           "sigmoid_gated_top1", "tokens_choose", "top_k_choices", "valid_tokens"]

SECOND_EXPERT_POLICIES = ("all", "random")
DROP_POLICIES = ("position", "probs")
DROP_RANKS = ("score", "gate")  # what drop_policy='probs' ranks an expert's choices by
PRIORITIES = ("k_major", "token_major")  # the order of drop_policy='position'


FORMS = ("choices", "slots", "soft", "merge")


@struct.dataclass(kw_only=True)
class RoutingOutput:
  """What every routing decision holds, whatever its form (the subclasses below).

  Attributes:
    probs: [G,S,E] float32 router probabilities (the statistics read them).
    tokens_per_expert: [G,E] float32 choices the router made for each expert before capacity
      (and before GShard's random second-expert policy); padding tokens excluded.
    kept_per_expert: [G,E] float32 choices that got a slot.
    aux_loss: [] float32 load-balancing loss (0 for routers that need none).
    z_loss: [] float32 router z-loss (set by the router modules, which see the logits).
    max_logit: [] float32 the largest router logit over real tokens and experts (what the z-loss
      bounds, ST-MoE); 0 for routers without logits.
  """
  form: ClassVar[str]
  probs: Array
  tokens_per_expert: Array
  kept_per_expert: Array
  aux_loss: Array
  z_loss: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  max_logit: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))

  @property
  def has_slots(self) -> bool:
    """Whether the decision fills capacity slots, i.e. can run on the einsum or index paths."""
    return True

  def token_experts(self) -> Tuple[Array, Array]:
    """Each token's experts: (selected, processed), both [G,S,E] bool; padding has neither."""
    raise NotImplementedError

  def dispatch_mask(self) -> Array:
    """[G,S,E,C]: token s fills slot c of expert e (bool; soft routing: float32 weights)."""
    raise NotImplementedError

  def combine_tensor(self) -> Array:
    """[G,S,E,C] float32: each token's combine weight for each slot."""
    raise NotImplementedError


class _SlotTensors:
  """The dense [G,S,E,C] tensors of the forms that name each slot's token (slot_token and
  slot_gate)."""

  def dispatch_mask(self) -> Array:
    tokens = jnp.arange(self.probs.shape[1], dtype=jnp.int32)[None, :, None, None]
    return self.slot_token[:, None, :, :] == tokens

  def combine_tensor(self) -> Array:
    return jnp.where(self.dispatch_mask(), self.slot_gate[:, None, :, :], 0.0)


@struct.dataclass(kw_only=True)
class TokenChoices(_SlotTensors, RoutingOutput):
  """Tokens choose (top-k and the routers that give each token its experts): K choices a token.

  Attributes:
    choice_expert: [G,S,K] int32 expert of each choice; E for a choice that is not processed
      (padding, a removed GShard 2nd choice, or dropped by capacity).
    choice_gate: [G,S,K] float32 combine weight of each choice; 0 where choice_expert is E.
    selected_expert: [G,S,K] int32 expert of each choice as the router made it, before
      capacity; E for padding and a removed GShard 2nd choice.
    slot_token: [G,E,C] int32, the token (index in its group) filling slot c of expert e; S for
      an empty slot. None without capacity (the dropless path), as are the next two.
    slot_gate: [G,E,C] float32 combine weight of that token for that expert; 0 when empty.
    choice_slot: [G,S,K] int32 flat slot e * C + c of each choice; E * C where not processed.
  """
  form: ClassVar[str] = "choices"
  choice_expert: Array
  choice_gate: Array
  selected_expert: Array
  slot_token: Optional[Array] = None
  slot_gate: Optional[Array] = None
  choice_slot: Optional[Array] = None

  @property
  def has_slots(self) -> bool:
    return self.slot_token is not None

  def token_experts(self):
    """selected: the router's choices, before capacity; processed: the choices kept."""
    num_experts = self.probs.shape[-1]
    experts = lambda choices: jax.nn.one_hot(choices, num_experts, dtype=jnp.bool_).any(axis=2)
    return experts(self.selected_expert), experts(self.choice_expert)  # E: no expert


@struct.dataclass(kw_only=True)
class ZeroComputeChoices(TokenChoices):
  """TokenChoices over the E FFN experts, plus the choices of MoE++'s Z zero-computation experts
  (routers/moepp.py), which take no slot: the layer computes them for every token from their
  gates (experts.ZeroComputationExperts), never dropped.

  Attributes:
    zero_gate: [G,S,Z] float32 each token's gate on each zero-computation expert; 0 where the
      token did not choose it (a chosen one's gate is a softmax probability, > 0).
    logits: [G,S,E+Z] float32 the router logits, which the next MoE layer's gating residual reads.
  """
  zero_gate: Array
  logits: Array


@struct.dataclass(kw_only=True)
class ExpertSlots(_SlotTensors, RoutingOutput):
  """Experts choose (expert choice): each slot names its token; a token may fill any number of
  slots, or none, so there are no per-token choices.

  Attributes:
    slot_token: [G,E,C] int32, the token filling slot c of expert e; S for an empty slot.
    slot_gate: [G,E,C] float32 its combine weight; 0 for an empty slot.
  """
  form: ClassVar[str] = "slots"
  slot_token: Array
  slot_gate: Array

  def token_experts(self):
    """selected = processed: the experts that took the token (a scatter over the slots)."""
    num_groups, group_size, num_experts = self.probs.shape
    expert = jnp.broadcast_to(jnp.arange(num_experts)[None, :, None], self.slot_token.shape)

    def taken(slots, experts):
      return jnp.zeros((group_size, num_experts), bool).at[slots, experts].set(True, mode="drop")

    taken = jax.vmap(taken)(self.slot_token, expert)
    return taken, taken


def _every_expert(probs: Array) -> Tuple[Array, Array]:
  """probs [G,S,E], 0 for padding -> (the top expert of each real token, every expert of each
  real token), [G,S,E] bool each: the token_experts of the forms whose experts all see a token."""
  real = jnp.broadcast_to(probs.sum(axis=-1, keepdims=True) > 0, probs.shape)
  top = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=jnp.bool_)
  return top & real, real


@struct.dataclass(kw_only=True)
class SoftSlots(RoutingOutput):
  """Soft routing (Soft MoE): every slot mixes all the group's tokens, so no slot has a token.

  Attributes:
    dispatch_weights: [G,S,E,C] float32 each token's share of each slot's input.
    combine_weights: [G,S,E,C] float32 each slot's share of each token's output.
  """
  form: ClassVar[str] = "soft"
  dispatch_weights: Array
  combine_weights: Array

  def token_experts(self):
    """selected: the expert with the largest combine weight (soft routing chooses nothing);
    processed: every expert, for every real token."""
    return _every_expert(self.probs)

  def dispatch_mask(self):
    return self.dispatch_weights

  def combine_tensor(self):
    return self.combine_weights


@struct.dataclass(kw_only=True)
class MergeWeights(RoutingOutput):
  """Merged experts (SMEAR): each group runs one FFN whose parameters are the experts' averaged
  by the group's merge weights; no slots, nothing dropped. probs are 0 for padding.

  Attributes:
    merge_weights: [G,E] float32 each group's weight of each expert: the mean of its real tokens'
      probabilities (all 0 for a group of padding alone).
  """
  form: ClassVar[str] = "merge"
  merge_weights: Array

  @property
  def has_slots(self) -> bool:
    return False

  def token_experts(self):
    """selected: the token's most probable expert (the merge chooses nothing); processed: every
    expert, whose parameters all enter the merged FFN, for every real token."""
    return _every_expert(self.probs)


def expert_capacity(group_size: int, num_experts: int, k: int = 1,
                    capacity_factor: float = 1.0, min_capacity: int = 4) -> int:
  """Slots per expert per group: max(min_capacity, ceil(k * capacity_factor * S / E))."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
  return max(min_capacity, math.ceil(k * capacity_factor * group_size / num_experts))


def valid_tokens(probs: Array, token_mask: Optional[Array]) -> Array:
  """[G,S] float32, 1 for real tokens and 0 for padding."""
  if token_mask is None:
    return jnp.ones(probs.shape[:-1], jnp.float32)
  return token_mask.astype(jnp.float32)


def mean_over_real_groups(per_group: Array, valid: Array) -> Array:
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
  valid = valid_tokens(probs, token_mask)
  count = jnp.maximum(valid.sum(axis=-1), 1.0)[..., None]
  fraction = (expert_mask.astype(jnp.float32) * valid[..., None]).sum(axis=-2) / count
  mean_prob = (probs * valid[..., None]).sum(axis=-2) / count
  num_experts = probs.shape[-1]
  per_group = num_experts * jnp.sum(fraction * mean_prob, axis=-1)  # [G]
  return mean_over_real_groups(per_group, valid)


def segment_balancing_loss(probs: Array, expert_mask: Array, segments: Array, num_segments: int,
                           token_mask: Optional[Array] = None) -> Array:
  """The Switch load-balancing loss E * sum_e f_e * P_e with f and P taken over segments of the
  tokens instead of groups: each sequence (DeepSeek-V3's sequence-wise loss) or the whole batch,
  one segment (the global-batch loss, Qiu et al. 2025, 2501.11873: under jit the batch is global,
  across data-parallel devices and processes); averaged over the segments with a real token.

  Args:
    probs: [G,S,E] router probabilities (summing to 1 per token).
    expert_mask: [G,S,E], 1 where the token chose expert e.
    segments: [G,S] int in [0, num_segments), each token's segment.
    num_segments: static count of segments.
    token_mask: [G,S], 1 for real tokens; padding counts nowhere.
  Returns:
    [] float32; k under uniform routing, as load_balancing_loss.
  """
  probs = probs.astype(jnp.float32)
  weight = valid_tokens(probs, token_mask).reshape(-1, 1)
  segments = segments.reshape(-1)
  total = lambda values: jax.ops.segment_sum(values.reshape(-1, values.shape[-1]) * weight,
                                             segments, num_segments)  # [N, E]
  count = jax.ops.segment_sum(weight[:, 0], segments, num_segments)  # [N]
  per_segment = probs.shape[-1] * jnp.sum(total(expert_mask.astype(jnp.float32))
                                          * total(probs), axis=-1)
  per_segment = per_segment / jnp.maximum(count, 1.0) ** 2
  has_real = (count > 0).astype(jnp.float32)
  return jnp.sum(per_segment * has_real) / jnp.maximum(has_real.sum(), 1.0)


def router_z_loss(logits: Array, token_mask: Optional[Array] = None) -> Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2. logits: [..., E]."""
  logits = logits.astype(jnp.float32)
  squared = jax.nn.logsumexp(logits, axis=-1) ** 2
  valid = valid_tokens(logits, token_mask)
  return jnp.sum(squared * valid) / jnp.maximum(valid.sum(), 1.0)


def importance_loss(probs: Array, token_mask: Optional[Array] = None) -> Array:
  """V-MoE importance loss: per group, CV^2 of each expert's probability summed over the group's
  real tokens; averaged over the groups that hold one (vmoe computes it per group too).

  probs: [G,S,E] (or [S,E], one group), the clean softmax (V-MoE: before the logit noise).
  token_mask: [G,S] (or [S]). Returns [] float32, 0 when every expert gets the same total.
  """
  probs = probs.astype(jnp.float32)
  valid = valid_tokens(probs, token_mask)
  importance = (probs * valid[..., None]).sum(axis=-2)  # [G,E]
  per_group = (jnp.var(importance, axis=-1)
               / jnp.maximum(jnp.mean(importance, axis=-1) ** 2, 1e-12))
  return mean_over_real_groups(per_group, valid)


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


def _queue_place(queue: Array) -> Array:
  """queue [G,N,E] one-hot requests (rows of zeros: none) in priority order -> [G,N] int32 each
  request's 0-based place in its expert's queue (-1 where none)."""
  return (jnp.cumsum(queue, axis=1) * queue).sum(axis=-1) - 1


def group_limit_bias(scores: Array, *, num_groups: int, groups_chosen: int, k: int,
                     score_experts: int = 0) -> Array:
  """Group-limited routing (DeepSeek-V3's node-limited routing; Megatron's group-limited top-k).

  The E experts form num_groups groups of E / num_groups consecutive experts (a node's or
  device's experts); each group is scored by the sum of its top n scores, n = score_experts, or
  k // groups_chosen when 0 (DeepSeek-V3's paper, Megatron-Core), and only the experts of the
  groups_chosen best groups stay selectable.

  Args: scores [..., E] the selection scores (loss-free: with their bias).
  Returns: [..., E] float32 selection bias, 0 for the experts allowed and -inf for the others.
  """
  *lead, num_experts = scores.shape
  grouped = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # float64 stays
  grouped = grouped.reshape(*lead, num_groups, num_experts // num_groups)
  top = score_experts or k // groups_chosen
  group_scores = jax.lax.top_k(grouped, top)[0].sum(axis=-1)  # [..., groups]
  chosen = jax.lax.top_k(group_scores, groups_chosen)[1]
  allowed = jax.nn.one_hot(chosen, num_groups, dtype=jnp.bool_).any(axis=-2)  # [..., groups]
  allowed = jnp.repeat(allowed, num_experts // num_groups, axis=-1)
  return jnp.where(allowed, 0.0, -jnp.inf)


def top_k_choices(probs: Array, *, k: int, renormalize: bool = False,
                  second_expert_policy: str = "all", rng: Optional[Array] = None,
                  token_mask: Optional[Array] = None, selection_bias: Optional[Array] = None,
                  gate_scale: float = 1.0, balance_probs: Optional[Array] = None,
                  top_p: Optional[float] = None, positive_only: bool = False,
                  replay: Optional[Array] = None):
  """Each token's top-k experts and combine weights, before any capacity.

  Args: see `tokens_choose`.
  Returns:
    expert_index [G,S,K] int32 (descending probability), gates [G,S,K] float32 (the router
    probabilities, divided by their top-k sum when `renormalize`, times gate_scale), routed
    [G,S,K] bool (False for
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
  probs = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))  # float64 stays float64
  valid = valid_tokens(probs, token_mask)

  if replay is not None:  # the recorded experts, E for no choice; their probabilities now
    recorded = replay < num_experts
    expert_index = jnp.where(recorded, replay, 0).astype(jnp.int32)
    top_probs = jnp.where(recorded, jnp.take_along_axis(probs, expert_index, axis=-1), 0.0)
  elif selection_bias is None:
    top_probs, expert_index = jax.lax.top_k(probs, k)  # [G,S,K]
  else:
    _, expert_index = jax.lax.top_k(probs + selection_bias.astype(jnp.float32), k)
    top_probs = jnp.take_along_axis(probs, expert_index, axis=-1)
  gates = top_probs
  if renormalize:
    gates = top_probs / jnp.maximum(top_probs.sum(axis=-1, keepdims=True), 1e-9)
  if gate_scale != 1.0:
    gates = gates * gate_scale
  gates = gates.astype(jnp.float32)
  routed = jnp.broadcast_to(valid[..., None] > 0, expert_index.shape)
  if replay is not None:  # the trace made the choice: no top_p, positive_only or 2nd policy
    routed = routed & recorded
    top_p, positive_only, second_expert_policy = None, False, "all"
  if top_p is not None:  # choices in order of probability until their sum reaches top_p
    routed = routed & ((jnp.cumsum(top_probs, axis=-1) - top_probs) < top_p)
  if positive_only:  # a score of exactly 0 (ReLU, saturated smooth steps) asks for no expert
    routed = routed & (top_probs > 0)
  choice_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G,S,K,E]
  tokens_per_expert = jnp.sum(choice_one_hot * routed[..., None], axis=(1, 2)).astype(jnp.float32)
  aux_loss = load_balancing_loss(probs if balance_probs is None else balance_probs,
                                 (choice_one_hot * routed[..., None]).max(axis=2), token_mask)

  if second_expert_policy == "random":
    second_share = top_probs[..., 1] / jnp.maximum(top_probs[..., 0] + top_probs[..., 1], 1e-9)
    keep_second = 2.0 * second_share > jax.random.uniform(rng, second_share.shape)
    routed = routed.at[..., 1].set(routed[..., 1] & keep_second)
  return expert_index.astype(jnp.int32), gates, routed, aux_loss, tokens_per_expert


def tokens_choose(probs: Array, *, k: int, capacity: Optional[int],
                  batch_prioritized: bool = False, renormalize: bool = False,
                  second_expert_policy: str = "all", rng: Optional[Array] = None,
                  token_mask: Optional[Array] = None, selection_bias: Optional[Array] = None,
                  gate_scale: float = 1.0, balance_probs: Optional[Array] = None,
                  drop_policy: str = "position", drop_rank: str = "score",
                  priority: str = "k_major", top_p: Optional[float] = None,
                  positive_only: bool = False, replay: Optional[Array] = None) -> TokenChoices:
  """Each token picks its top-k experts; experts keep the first `capacity` choices they get.

  Priority is k-major by default: every token's 1st choice claims a slot before any 2nd choice
  (GShard); token-major gives each expert its askers in token order, whatever the rank
  (Megatron-Core's position policy). Tokens go in group order, or by descending top-1
  probability when `batch_prioritized` (V-MoE). The combine weight is the router probability of
  the expert, divided by the sum of the token's top-k probabilities when `renormalize` (before
  any dropping).

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
    selection_bias: [E] (or [G,S,E]) added to probs only to choose the top-k (loss-free
      balancing; -inf outside a token's allowed experts: group-limited routing); the gates and
      batch priorities stay the unbiased probs.
    gate_scale: multiplies the gates, after any renormalization (DeepSeek-V3's routed scaling
      factor).
    balance_probs: [G,S,E] the probabilities of the load-balancing loss (default: probs; scores
      that do not sum to 1, such as sigmoid's, are normalized first).
    top_p: dynamic routing (Huang et al. 2024): of its k best experts a token keeps them in
      order of probability until their sum reaches top_p (at least one); the rest are no
      choices at all (no slot, not in the counts or the balancing loss).
    positive_only: only the choices with a score above 0 are choices (ReLU gates, DSelect-k's
      saturated selectors: a token uses the experts its gates do not zero); the rest are no
      choices, as top_p's.
    drop_policy: which choices an expert keeps when more ask than it has slots: 'position' (the
      priority above) or 'probs' (its highest-ranked choices, whatever their rank or token:
      Megatron's moe_token_drop_policy='probs'; batch_prioritized does not apply).
    drop_rank: what 'probs' ranks by: 'score' (the choice's entry of probs) or 'gate' (its
      combine weight, renormalized and scaled: Megatron-Core's).
    priority: 'k_major' or 'token_major', the order of drop_policy='position'.
    replay: [G,S,K] int, recorded choices (a routing trace's selected experts, E for no choice)
      that replace the top-k (Megatron's moe_enable_routing_replay): selection_bias, top_p,
      positive_only and the 2nd-expert policy do not apply; the gates, the balancing loss and
      the capacity are computed as for the router's own choices, from `probs`.
  Returns:
    TokenChoices with C = capacity (no slots when None) and aux_loss = load_balancing_loss on the
    top-k choices.
  """
  num_groups, group_size, num_experts = probs.shape
  expert_index, gates, routed, aux_loss, tokens_per_expert = top_k_choices(
      probs, k=k, renormalize=renormalize, second_expert_policy=second_expert_policy, rng=rng,
      token_mask=token_mask, selection_bias=selection_bias, gate_scale=gate_scale,
      balance_probs=balance_probs, top_p=top_p, positive_only=positive_only, replay=replay)
  probs = probs.astype(jnp.float32)
  choice_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G,S,K,E]
  if capacity is None:
    kept_per_expert = jnp.sum(choice_one_hot * routed[..., None], axis=(1, 2))
    return TokenChoices(probs=probs, tokens_per_expert=tokens_per_expert,
                        kept_per_expert=kept_per_expert.astype(jnp.float32), aux_loss=aux_loss,
                        choice_expert=jnp.where(routed, expert_index, num_experts),
                        choice_gate=jnp.where(routed, gates, 0.0),
                        selected_expert=jnp.where(routed, expert_index, num_experts))

  # Place of each choice in its expert's queue: a cumulative count in priority order.
  requests = choice_one_hot * routed[..., None]  # [G,S,K,E]
  if drop_policy == "probs":  # every choice by its own score or gate, across ranks and tokens
    value = gates if drop_rank == "gate" else jnp.take_along_axis(probs, expert_index, axis=-1)
    order = jnp.argsort(-jnp.where(routed, value, -1.0).reshape(num_groups, -1), axis=1,
                        stable=True)  # -> (s, k)
    queue = jnp.take_along_axis(requests.reshape(num_groups, -1, num_experts),
                                order[..., None], axis=1)
    slot_index = jnp.take_along_axis(_queue_place(queue), jnp.argsort(order, axis=1), axis=1)
    slot_index = slot_index.reshape(num_groups, group_size, k)
  else:
    if batch_prioritized:
      order = jnp.argsort(-probs.max(axis=-1), axis=1, stable=True)  # [G,S] priority -> token
      requests = jnp.take_along_axis(requests, order[:, :, None, None], axis=1)
    if priority == "token_major":  # a token's choices go to distinct experts: any order
      slot_index = _queue_place(requests.reshape(num_groups, group_size * k, num_experts))
      slot_index = slot_index.reshape(num_groups, group_size, k)
    else:
      queue = jnp.swapaxes(requests, 1, 2).reshape(num_groups, k * group_size, num_experts)
      slot_index = _queue_place(queue).reshape(num_groups, k, group_size).swapaxes(1, 2)
    if batch_prioritized:
      slot_index = jnp.take_along_axis(slot_index, jnp.argsort(order, axis=1)[:, :, None],
                                       axis=1)
  kept = routed & (slot_index < capacity)

  slot_token, slot_gate = _fill_slots(expert_index, slot_index, gates, kept, num_experts,
                                      capacity)
  kept_per_expert = jnp.sum(choice_one_hot * kept[..., None], axis=(1, 2)).astype(jnp.float32)
  choice_slot = jnp.where(kept, expert_index * capacity + slot_index, num_experts * capacity)
  return TokenChoices(probs=probs, tokens_per_expert=tokens_per_expert,
                      kept_per_expert=kept_per_expert, aux_loss=aux_loss,
                      choice_expert=jnp.where(kept, expert_index, num_experts),
                      choice_gate=jnp.where(kept, gates, 0.0),
                      selected_expert=jnp.where(routed, expert_index, num_experts),
                      slot_token=slot_token, slot_gate=slot_gate,
                      choice_slot=choice_slot.astype(jnp.int32))


def experts_choose(probs: Array, *, capacity: int,
                   token_mask: Optional[Array] = None) -> ExpertSlots:
  """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens of the group.

  Reads every token of the group, so it is not causal. Combine weight = router probability.

  Args:
    probs: [G,S,E] router probabilities.
    capacity: C <= S tokens per expert.
    token_mask: [G,S], 1 for real tokens; an expert never takes padding (a slot it would fill with
      padding, when the group has fewer than C real tokens, stays empty).
  Returns:
    ExpertSlots; aux_loss is 0 (balanced by construction).
  """
  num_groups, group_size, num_experts = probs.shape
  if not 1 <= capacity <= group_size:
    raise ValueError(f"capacity={capacity} must be in [1, group_size={group_size}] "
                     "for expert choice")
  probs = probs.astype(jnp.float32)
  valid = valid_tokens(probs, token_mask)
  # Probabilities are >= 0, so padding scored -1 is chosen only after every real token.
  scores = jnp.where(valid[..., None] > 0, probs, -1.0)
  gate, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G,E,C]
  taken = gate >= 0
  slot_token = jnp.where(taken, token, group_size).astype(jnp.int32)
  slot_gate = jnp.where(taken, gate, 0.0)
  kept_per_expert = taken.sum(axis=-1).astype(jnp.float32)
  return ExpertSlots(probs=probs, tokens_per_expert=kept_per_expert,
                     kept_per_expert=kept_per_expert, aux_loss=jnp.zeros((), jnp.float32),
                     slot_token=slot_token, slot_gate=slot_gate)


def experts_merge(probs: Array, token_mask: Optional[Array] = None) -> MergeWeights:
  """SMEAR (Muqeeth et al. 2023): each group's merge weights, the mean of the router
  probabilities over its real tokens (the paper averages over an example; a group here).

  Reads every token of the group, so it is not causal. No balancing loss (the paper uses none).

  Args:
    probs: [G,S,E] router probabilities.
    token_mask: [G,S], 1 for real tokens; padding counts in no mean.
  Returns:
    MergeWeights; tokens_per_expert = kept_per_expert = the summed probabilities [G,E].
  """
  probs = probs.astype(jnp.float32)
  valid = valid_tokens(probs, token_mask)
  probs = probs * valid[..., None]
  load = probs.sum(axis=1)  # [G,E]
  return MergeWeights(probs=probs, tokens_per_expert=load, kept_per_expert=load,
                      aux_loss=jnp.zeros((), jnp.float32),
                      merge_weights=load / jnp.maximum(valid.sum(axis=1), 1.0)[:, None])


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
  valid = valid_tokens(clean_logits, token_mask)[..., None]
  load = (chosen * valid).reshape(-1, chosen.shape[-1]).sum(axis=0)
  return jnp.var(load) / jnp.maximum(jnp.mean(load) ** 2, 1e-12)


def assign_top1(expert_index: Array, gates: Array, num_experts: int, *, capacity: int,
                probs: Optional[Array] = None, token_mask: Optional[Array] = None
                ) -> TokenChoices:
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
    TokenChoices (K = 1); aux_loss is 0.
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


def sigmoid_gated_top1(logits: Array, expert_index: Array, *, capacity: Optional[int],
                       token_mask: Optional[Array] = None) -> TokenChoices:
  """Each token to the expert it was given, gated by sigmoid(its logit for that expert), as BASE
  and S-BASE gate; softmax(logits) for the statistics. logits [G,S,E], expert_index [G,S]."""
  affinity = jnp.take_along_axis(logits, expert_index[..., None], axis=-1)[..., 0]
  return assign_top1(expert_index, jax.nn.sigmoid(affinity), logits.shape[-1],
                     capacity=capacity, probs=jax.nn.softmax(logits, axis=-1),
                     token_mask=token_mask)


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


def loss_free_bias_update(bias: Array, load: Array, rate: float) -> Array:
  """Loss-free balancing step: b_e += rate * sign(mean_e load_e - load_e), in float32.

  bias, load: [E] (load: choices per expert before capacity). Overloaded experts lose bias,
  underloaded ones gain it; an expert exactly at the mean keeps its bias.
  """
  load = jax.lax.stop_gradient(load.astype(jnp.float32))
  return bias.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load) - load)
