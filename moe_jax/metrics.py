"""Routing statistics of one MoE layer (definitions: docs/ROUTING.md, "Routing statistics").

They derive from additive totals (`routing_sums`), so that the totals of a batch's micro-batches
(train.py's gradient accumulation) give the statistics of the whole batch. A router adds its own
(routers.Router.statistics) as the ratio of two sums, under routing_sums' key ROUTER.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingOutput

Array = jax.Array

__all__ = ["ROUTER", "entropy", "routing_statistics", "routing_sums", "statistics", "total_sums"]

ROUTER = "router"  # the routing_sums key of the router's own: {name: (numerator, denominator)}


def entropy(p: Array) -> Array:
  """[..., E] distributions -> [...] their entropy in nats."""
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def routing_sums(routing: RoutingOutput, token_mask: Array,
                 router_sums: Optional[Dict[str, Tuple[Array, Array]]] = None) -> Dict[str, Any]:
  """The totals the statistics derive from, over all groups; padding tokens excluded.

  Args:
    routing: the layer's RoutingOutput (probs [G,S,E]).
    token_mask: [G,S], 1 for real tokens.
    router_sums: the router's own (Router.statistic_sums): {name: (numerator, denominator)}.
  Returns a dict of float32 arrays, each a sum over tokens except max_logit (a max):
    requested [E]: the router's choices per expert (before capacity).
    kept []: the choices that got a slot.
    tokens []: real tokens.
    unrouted []: tokens that no expert processed.
    experts []: experts that processed each token.
    entropy []: H(p) of each token's scores normalized to sum to 1, in nats.
    top1 []: max_e p of the same p.
    max_logit []: the largest router logit (0 for routers without logits).
    ROUTER: router_sums, where given.
  """
  valid = token_mask.astype(jnp.float32)
  _, processed = routing.token_experts()  # [G,S,E]; soft routing: every expert
  # A distribution over experts: sigmoid scores (loss_free) sum to anything in (0, E).
  total = routing.probs.sum(axis=-1, keepdims=True)
  probs = routing.probs / jnp.where(total > 0, total, 1.0)
  sums = {
      "requested": routing.tokens_per_expert.sum(axis=0),
      "kept": routing.kept_per_expert.sum(),
      "tokens": valid.sum(),
      "unrouted": jnp.sum(~processed.any(axis=-1) * valid),
      "experts": jnp.sum(processed.sum(axis=-1) * valid),
      "entropy": jnp.sum(entropy(probs) * valid),
      "top1": jnp.sum(probs.max(axis=-1) * valid),
      "max_logit": routing.max_logit,
  }
  if router_sums:
    sums[ROUTER] = {name: (jnp.asarray(numerator, jnp.float32),
                           jnp.asarray(denominator, jnp.float32))
                    for name, (numerator, denominator) in router_sums.items()}
  return sums


def total_sums(stacked: Dict[str, Any]) -> Dict[str, Any]:
  """routing_sums of several calls stacked on a leading axis -> the routing_sums of them all."""
  return {key: value.max(axis=0) if key == "max_logit" else jax.tree.map(
      lambda sum_: sum_.sum(axis=0), value) for key, value in stacked.items()}


def statistics(sums: Dict[str, Any]) -> Dict[str, Array]:
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
    and the router's own, numerator / denominator of their sums (0 where it is 0).
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
  for name, (numerator, denominator) in sums.get(ROUTER, {}).items():
    nonzero = denominator > 0
    stats[name] = jnp.where(nonzero, numerator, 0.0) / jnp.where(nonzero, denominator, 1.0)
  return stats


def routing_statistics(routing: RoutingOutput, token_mask: Array) -> Dict[str, Array]:
  """statistics(routing_sums(routing, token_mask)): the layer's statistics of one routing
  decision (without the router's own)."""
  return statistics(routing_sums(routing, token_mask))
