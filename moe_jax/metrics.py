"""Routing statistics of one MoE layer (definitions: docs/ROUTING.md, "Routing statistics").

They derive from additive totals (`routing_sums`), so that the totals of a batch's micro-batches
(train.py's gradient accumulation) give the statistics of the whole batch.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from moe_jax.routing import MergeWeights, RoutingOutput, ZeroComputeChoices

Array = jax.Array

__all__ = ["routing_statistics", "routing_sums", "statistics", "total_sums"]


def _entropy(p: Array) -> Array:
  """[..., E] distributions -> [...] their entropy in nats."""
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def routing_sums(routing: RoutingOutput, token_mask: Array) -> Dict[str, Array]:
  """The totals the statistics derive from, over all groups; padding tokens excluded.

  Args:
    routing: the layer's RoutingOutput (probs [G,S,E]).
    token_mask: [G,S], 1 for real tokens.
  Returns a dict of float32 arrays, each a sum over tokens except max_logit (a max):
    requested [E]: the router's choices per expert (before capacity).
    kept []: the choices that got a slot.
    tokens []: real tokens.
    unrouted []: tokens that no expert processed.
    experts []: experts that processed each token.
    entropy []: H(p) of each token's scores normalized to sum to 1, in nats.
    top1 []: max_e p of the same p.
    max_logit []: the largest router logit (0 for routers without logits).
    zero_choices []: MoE++ only, the choices of zero-computation experts.
    merge_entropy []: merged experts (SMEAR) only, H of the merge weights of each group with a
      real token, in nats; merge_groups []: those groups.
  """
  valid = token_mask.astype(jnp.float32)
  _, processed = routing.token_experts()  # [G,S,E]; soft routing: every expert
  # A distribution over experts: sigmoid scores (loss_free) sum to anything in (0, E).
  total = routing.probs.sum(axis=-1, keepdims=True)
  probs = routing.probs / jnp.where(total > 0, total, 1.0)
  entropy = _entropy(probs)
  sums = {
      "requested": routing.tokens_per_expert.sum(axis=0),
      "kept": routing.kept_per_expert.sum(),
      "tokens": valid.sum(),
      "unrouted": jnp.sum(~processed.any(axis=-1) * valid),
      "experts": jnp.sum(processed.sum(axis=-1) * valid),
      "entropy": jnp.sum(entropy * valid),
      "top1": jnp.sum(probs.max(axis=-1) * valid),
      "max_logit": routing.max_logit,
  }
  if isinstance(routing, ZeroComputeChoices):  # MoE++: the choices no FFN expert computes
    sums["zero_choices"] = jnp.sum((routing.zero_gate > 0).sum(axis=-1) * valid)
  if isinstance(routing, MergeWeights):  # SMEAR: how many experts each group's FFN mixes
    has_real = (valid.sum(axis=-1) > 0).astype(jnp.float32)
    sums["merge_entropy"] = jnp.sum(_entropy(routing.merge_weights) * has_real)
    sums["merge_groups"] = has_real.sum()
  return sums


def total_sums(stacked: Dict[str, Array]) -> Dict[str, Array]:
  """routing_sums of several calls stacked on a leading axis -> the routing_sums of them all."""
  return {key: value.max(axis=0) if key == "max_logit" else value.sum(axis=0)
          for key, value in stacked.items()}


def statistics(sums: Dict[str, Array]) -> Dict[str, Array]:
  """The statistics of routing_sums' totals, a dict of float32 arrays:
    expert_load [E]: share of the router's choices per expert (before capacity); ideal 1/E.
    load_cv []: std / mean of expert_load.
    max_violation []: MaxVio = max load / mean load - 1.
    dropped_fraction []: 1 - kept choices / requested choices (k T for tokens-choose).
    unrouted_fraction []: share of tokens that no expert processed (0 for soft routing, whose
      slots mix every token).
    experts_per_token []: mean number of experts that processed a token (k less the drops for
      top-k; what dynamic routers realize; E for soft routing).
    router_entropy []: mean H(p) in nats (ln E when uniform), where p is the token's scores
      normalized to sum to 1 (loss_free's sigmoid affinities do not).
    top1_confidence []: mean max_e p, of the same normalized p.
    max_logit []: the largest router logit (0 for routers without logits).
    zero_computation_share []: MoE++ only: the share of the router's choices that went to
      zero-computation experts (experts_per_token: the FFN experts per token).
    merge_entropy []: merged experts (SMEAR) only: the mean over groups of the entropy of the
      merge weights in nats (ln E: every expert weighted equally; 0: one expert).
  """
  num_valid = jnp.maximum(sums["tokens"], 1.0)
  requested = sums["requested"]
  load = requested / jnp.maximum(requested.sum(), 1.0)
  mean_load = jnp.mean(load)
  stats = {
      "expert_load": load,
      "load_cv": jnp.std(load) / mean_load,
      "max_violation": jnp.max(load) / mean_load - 1.0,
      "dropped_fraction": 1.0 - sums["kept"] / jnp.maximum(requested.sum(), 1.0),
      "unrouted_fraction": sums["unrouted"] / num_valid,
      "experts_per_token": sums["experts"] / num_valid,
      "router_entropy": sums["entropy"] / num_valid,
      "top1_confidence": sums["top1"] / num_valid,
      "max_logit": sums["max_logit"],
  }
  if "zero_choices" in sums:
    stats["zero_computation_share"] = sums["zero_choices"] / jnp.maximum(
        sums["zero_choices"] + requested.sum(), 1.0)
  if "merge_groups" in sums:
    stats["merge_entropy"] = sums["merge_entropy"] / jnp.maximum(sums["merge_groups"], 1.0)
  return stats


def routing_statistics(routing: RoutingOutput, token_mask: Array) -> Dict[str, Array]:
  """statistics(routing_sums(routing, token_mask)): the statistics of one routing decision."""
  return statistics(routing_sums(routing, token_mask))
