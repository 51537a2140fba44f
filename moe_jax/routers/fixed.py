"""Routers without parameters: hash layers and the random baseline."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from moe_jax.routers.base import Router, RouterCost, register
from moe_jax.routing import assign_top1, hash_buckets

__all__ = ["FixedRouter", "HashRouter", "RandomRouter"]


class FixedRouter(Router):
  """Base of the routers without parameters: each token to one expert, gate 1, no losses.

  Subclasses choose the expert (`choose`); nothing is learned, so there is no router kernel,
  and the statistics see one-hot probabilities (entropy 0). jitter_eps, noise_std, init_scale
  and batch_prioritized do not apply.
  """
  fixed_k = True
  learned = False

  def cost(self, layer, model_dim):
    del model_dim
    return RouterCost(params=0, flops_per_token=0, experts_per_token=1)

  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S], token_ids [G,S] -> TokenChoices (K = 1)."""
    expert_index = self.choose(x.shape[:2], token_ids=token_ids, deterministic=deterministic)
    return assign_top1(expert_index, jnp.ones(x.shape[:2], jnp.float32), self.num_experts,
                       capacity=capacity, token_mask=token_mask)

  def choose(self, shape, *, token_ids, deterministic) -> jax.Array:
    """[G,S] int expert of every token of a [G,S] shape."""
    raise NotImplementedError


@register("hash")
class HashRouter(FixedRouter):
  """Hash layers (Roller et al. 2021): expert = hash_buckets(num_ids)[token id], a fixed random
  table that gives every expert an equal share of the ids [0, num_ids) (LM: the vocabulary;
  ViT: patch positions with the class token)."""
  uses_token_ids = True

  def choose(self, shape, *, token_ids, deterministic):
    del shape, deterministic
    buckets = jnp.asarray(hash_buckets(self.num_ids, self.num_experts))
    return buckets[token_ids]


@register("random")
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

