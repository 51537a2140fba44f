"""Dispatch and combine: moving tokens into expert buffers and back (letters: see routing.py).

Two paths with the same result:
  einsum: the GShard/Switch form. Dense [G,S,E,C] masks contract with the tokens; dispatch plus
    combine cost about 2S/(nH) of the expert matmuls (n expert matrices), so groups must be small.
  index: gathers each slot's token into a [G,E,C,M] buffer and scatter-adds the weighted expert
    outputs back. No dense mask; the cost does not grow with the group size.
Empty slots hold zeros and carry zero combine weight, so a token no expert kept gets exactly 0.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingOutput

Array = jax.Array

DISPATCH_PATHS = ("einsum", "index")


def group_tokens(x: Array, token_mask: Optional[Array], group_size: int):
  """Flattens tokens and splits them into groups, padding the last group.

  Args:
    x: [..., M] tokens.
    token_mask: [...] (1 = real token) or None.
    group_size: S; the effective size is min(S, number of tokens), so a small batch is not padded
      up to one large group.
  Returns:
    (x [G,S,M], token_mask [G,S] bool); padding tokens are zeros with mask False.
  """
  tokens = x.reshape(-1, x.shape[-1])
  num_tokens = tokens.shape[0]
  mask = (jnp.ones((num_tokens,), bool) if token_mask is None
          else token_mask.reshape(-1).astype(bool))
  group_size = min(group_size, num_tokens)
  num_groups = math.ceil(num_tokens / group_size)
  pad = num_groups * group_size - num_tokens
  tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
  mask = jnp.pad(mask, (0, pad))
  return tokens.reshape(num_groups, group_size, -1), mask.reshape(num_groups, group_size)


def ungroup_tokens(y: Array, shape: tuple) -> Array:
  """Inverse of group_tokens: y [G,S,M] -> [*shape] with the padding removed."""
  num_tokens = math.prod(shape[:-1])
  return y.reshape(-1, y.shape[-1])[:num_tokens].reshape(shape)


def einsum_dispatch(x: Array, routing: RoutingOutput) -> Array:
  """x [G,S,M] -> expert buffers [G,E,C,M] through the dense dispatch mask."""
  return jnp.einsum("gsm,gsec->gecm", x, routing.dispatch.astype(x.dtype))


def einsum_combine(expert_out: Array, routing: RoutingOutput) -> Array:
  """Expert outputs [G,E,C,M] -> [G,S,M] weighted by the dense combine tensor."""
  return jnp.einsum("gecm,gsec->gsm", expert_out, routing.combine.astype(expert_out.dtype))


def index_dispatch(x: Array, routing: RoutingOutput) -> Array:
  """x [G,S,M] -> [G,E,C,M]: gathers the token of every slot (empty slots read zeros)."""
  gather = lambda xg, slots: xg.at[slots].get(mode="fill", fill_value=0)
  return jax.vmap(gather)(x, routing.slot_token)


def index_combine(expert_out: Array, routing: RoutingOutput) -> Array:
  """[G,E,C,M] -> [G,S,M]: scatter-adds each slot's weighted output to its token."""
  group_size = routing.probs.shape[1]
  weighted = expert_out * routing.slot_gate[..., None].astype(expert_out.dtype)

  def scatter(out_g, slots):
    zeros = jnp.zeros((group_size, out_g.shape[-1]), out_g.dtype)
    return zeros.at[slots].add(out_g, mode="drop")  # empty slots point past the end

  return jax.vmap(scatter)(weighted, routing.slot_token)


def dispatch(x: Array, routing: RoutingOutput, path: str) -> Array:
  """x [G,S,M] -> [G,E,C,M] by the named path (soft routing: always einsum, its only form)."""
  if path == "einsum" or routing.soft:
    return einsum_dispatch(x, routing)
  return index_dispatch(x, routing)


def combine(expert_out: Array, routing: RoutingOutput, path: str) -> Array:
  """[G,E,C,M] -> [G,S,M] by the named path (soft routing: always einsum)."""
  if path == "einsum" or routing.soft:
    return einsum_combine(expert_out, routing)
  return index_combine(expert_out, routing)
