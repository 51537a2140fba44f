"""Mixture-of-Depths (Raposo et al. 2024): a routed block processes only the top capacity-fraction
of each sequence's tokens; the others skip it on the residual stream.

Letters: B batch, T tokens per example, K tokens processed per example, M width, P predictor
hidden width. A linear router gives each token a scalar weight r = x w + b (float32). K = max(1,
ceil(capacity T)) tokens of each sequence go through the block (attention + MLP) as a sequence of
their own, in token order: a processed token becomes x + r f(x), f the block's two residual
branches (block(x) - x), so the router gets gradients through r; a skipped token stays x.

The top-k over the sequence reads later tokens. For the causal LM the paper adds a predictor (a
small MLP on the stop-gradient of the block input, trained by binary cross-entropy to tell the
top-k tokens, the 'mod_predictor_loss' sown under 'losses'); evaluation (deterministic calls)
then processes the tokens the predictor picks (logit > 0), the first K of them in token order:
each decision reads its own token, and attention among the processed tokens stays causal.
Training keeps the top-k, as in the paper. Config: model.mod.every (0: none; blocks every-1,
2 every-1, ...; the paper: every other block), model.mod.capacity (the paper: 0.125),
model.mod.predictor_dim (P; the LM needs one, the ViT evaluates by the top-k).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_jax.routing import experts_choose

Array = jax.Array


def num_processed(capacity: float, length: int) -> int:
  """K: tokens of a sequence of `length` that a routed block processes."""
  return min(length, max(1, math.ceil(capacity * length)))


class RoutedBlock(nn.Module):
  """A Mixture-of-Depths block: x [B,T,M] -> ([B,T,M], router_logits) through `block` (a Block
  constructor, the child 'block') for K tokens of each sequence. token_ids, domain_ids and
  token_mask [B,T] as Block's; padding is never processed. router_logits (MoE++'s, of every
  token) pass unchanged."""
  block: Optional[Callable[..., nn.Module]]
  capacity: float = 0.125
  predictor_dim: int = 0

  def cost(self, width: int, length: int) -> Tuple[int, int, int]:
    """(parameters, FLOPs per token, K) of the router and predictor, for a sequence of `length`
    (models/common.stack_counts adds the block's FLOPs at K of `length` tokens)."""
    params = width + 1 + (width + 2) * self.predictor_dim + (self.predictor_dim > 0)
    flops = 2 * width + 2 * (width + 1) * self.predictor_dim
    return params, flops, num_processed(self.capacity, length)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool, token_ids: Optional[Array] = None,
               domain_ids: Optional[Array] = None, token_mask: Optional[Array] = None,
               router_logits: Optional[Array] = None):
    batch, length, _ = x.shape
    k = num_processed(self.capacity, length)
    real = jnp.ones((batch, length), bool) if token_mask is None else token_mask.astype(bool)
    dense = functools.partial(nn.Dense, dtype=jnp.float32, param_dtype=jnp.float32)
    inputs = x.astype(jnp.float32)
    weight = dense(1, name="router")(inputs)[..., 0]  # [B,T]
    # Expert choice with one expert over each sequence: its top-K tokens (sigmoid keeps the
    # order and makes the scores >= 0, as experts_choose wants).
    top = experts_choose(jax.nn.sigmoid(weight)[..., None], capacity=k, token_mask=real)
    chosen = top.token_experts()[0][..., 0]  # [B,T]
    if self.predictor_dim:
      hidden = nn.gelu(dense(self.predictor_dim, name="predictor_hidden")(
          jax.lax.stop_gradient(inputs)))
      logit = dense(1, name="predictor_out")(hidden)[..., 0]  # [B,T]
      loss = optax.sigmoid_binary_cross_entropy(logit, chosen.astype(jnp.float32))
      self.sow("losses", "mod_predictor_loss",
               jnp.sum(loss * real) / jnp.maximum(real.sum(), 1))
      if deterministic:
        chosen = (logit > 0) & real
    # The chosen tokens first, in token order; when fewer than K are chosen the rest are
    # fillers, after every chosen token (so causal attention hides them) and never applied.
    order = jnp.argsort(~chosen, axis=1, stable=True)[:, :k]  # [B,K]
    taken = jnp.take_along_axis(chosen, order, axis=1)  # [B,K]
    picked = jnp.take_along_axis(x, order[..., None], axis=1)  # [B,K,M]
    ids, domains = (None if a is None else jnp.take_along_axis(a, order, axis=1)
                    for a in (token_ids, domain_ids))
    # MoE++'s carried router logits pass the block unchanged: they are of every token
    out, _ = self.block(name="block")(picked, deterministic=deterministic, token_ids=ids,
                                      domain_ids=domains, token_mask=taken)
    gate = jnp.where(taken, jnp.take_along_axis(weight, order, axis=1), 0.0)  # [B,K]
    update = (out - picked) * gate[..., None].astype(x.dtype)
    return x.at[jnp.arange(batch)[:, None], order].add(update), router_logits


def routed_blocks(config, *, causal: bool) -> Dict[int, Callable[..., RoutedBlock]]:
  """{block index: RoutedBlock constructor (takes the Block constructor)} for config.mod ({}
  without one, or with mod.every=0); one-line errors naming the field."""
  mod: Any = config.get("mod")
  if mod is None or mod.every == 0:
    return {}
  if mod.every < 0:
    raise ValueError(f"model.mod.every={mod.every} must be >= 0 (0: no routed blocks)")
  if not 0 < mod.capacity <= 1:
    raise ValueError(f"model.mod.capacity={mod.capacity} must be in (0, 1]")
  if mod.predictor_dim < 0:
    raise ValueError(f"model.mod.predictor_dim={mod.predictor_dim} must be >= 0")
  if causal and not mod.predictor_dim:
    raise ValueError("model.mod.predictor_dim=0: the top-k over the sequence reads later "
                     "tokens, so the causal LM evaluates by the predictor; set its width > 0")
  if not causal and mod.predictor_dim:
    raise ValueError(f"model.mod.predictor_dim={mod.predictor_dim} is for the causal LM; the "
                     "ViT evaluates by the top-k (set 0)")
  if causal and config.positions == "rope":
    raise ValueError("model.mod: a routed block attends among the chosen tokens, whose RoPE "
                     "positions would be their ranks; set model.positions='learned'")
  indices = range(mod.every - 1, config.num_layers, mod.every)
  if not indices:
    raise ValueError(f"model.mod.every={mod.every} places no routed block among "
                     f"model.num_layers={config.num_layers}")
  return {index: functools.partial(RoutedBlock, capacity=mod.capacity,
                                   predictor_dim=mod.predictor_dim) for index in indices}
