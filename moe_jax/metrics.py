"""Routing statistics of one MoE layer (definitions: docs/ROUTING.md, "Routing statistics")."""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingOutput

Array = jax.Array

__all__ = ["routing_statistics"]


def routing_statistics(routing: RoutingOutput, token_mask: Array) -> Dict[str, Array]:
  """Summaries of one routing decision over all its groups; padding tokens excluded.

  Args:
    routing: the layer's RoutingOutput (probs [G,S,E]).
    token_mask: [G,S], 1 for real tokens.
  Returns a dict of float32 arrays:
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
  """
  valid = token_mask.astype(jnp.float32)
  num_valid = jnp.maximum(valid.sum(), 1.0)
  requested = routing.tokens_per_expert.sum(axis=0)  # [E]
  load = requested / jnp.maximum(requested.sum(), 1.0)
  mean_load = jnp.mean(load)

  _, processed = routing.token_experts()  # [G,S,E]; soft routing: every expert
  unrouted = jnp.sum(~processed.any(axis=-1) * valid) / num_valid
  experts_per_token = jnp.sum(processed.sum(axis=-1) * valid) / num_valid

  # A distribution over experts: sigmoid scores (loss_free) sum to anything in (0, E).
  total = routing.probs.sum(axis=-1, keepdims=True)
  probs = routing.probs / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return {
      "expert_load": load,
      "load_cv": jnp.std(load) / mean_load,
      "max_violation": jnp.max(load) / mean_load - 1.0,
      "dropped_fraction": 1.0 - routing.kept_per_expert.sum() / jnp.maximum(requested.sum(), 1.0),
      "unrouted_fraction": unrouted,
      "experts_per_token": experts_per_token,
      "router_entropy": jnp.sum(entropy * valid) / num_valid,
      "top1_confidence": jnp.sum(probs.max(axis=-1) * valid) / num_valid,
      "max_logit": routing.max_logit,
  }
