"""Decoder-only Transformer language model with optional MoE layers.

inputs int32 [B,L] -> token embedding [B,L,M] (+ learned positions, or RoPE in every attention)
-> causal blocks -> norm -> tied output head -> logits [B,L,V] float32.

The output head is tied to the token embedding (logits = h E^T, as in GPT-2/nanoGPT): one V x M
matrix instead of two, which matters little for bytes (V = 256) but keeps small models small.

Causality of the MoE layers: they are built with causal=True, so MoeLayer refuses routers that
read future tokens (expert choice, soft, base, batch_prioritized). The MoE layers get the input
token ids, which hash routing routes by. Top-1 routing in token order is causal:
a token's slot depends only on tokens before it in its group. Two caveats remain:
  - Groups span sequences (tokens are flattened batch-major), so a token's capacity depends on
    the earlier sequences of its group: batch-dependent, but never on its own future.
  - k-major top-k with k > 1 (gshard, topk) is not strictly causal when capacity binds: every
    first choice, including a later token's, claims a slot before any second choice.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import MoeLayer
from moe_jax.validation import check_choice
from moe_jax.models import common, mod

Array = jax.Array

POSITIONS = ("rope", "learned")


class Model(nn.Module):
  """Decoder LM; `moe` maps block index -> MoeLayer constructor (common.moe_layers), `mod`
  block index -> Mixture-of-Depths RoutedBlock constructor (mod.routed_blocks)."""
  vocab_size: int
  max_len: int
  num_layers: int
  width: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm: str = "rmsnorm"
  positions: str = "rope"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  moe: Dict[int, Callable[..., MoeLayer]] = dataclasses.field(default_factory=dict)
  mod: Dict[int, Callable[..., nn.Module]] = dataclasses.field(default_factory=dict)

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool, mask: Optional[Array] = None,
               domains: Optional[Array] = None) -> Array:
    """inputs int32 [B,L], L <= max_len, mask bool [B] (False: a padding example, routed by no
    MoE layer and counted in no routing loss or statistic), domains int32 [B] (each sequence's
    domain label, which domain routing reads; None: no labels) -> next-token logits float32
    [B,L,V]."""
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="embed")
    x = embed(inputs)
    if self.positions == "learned":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                       (self.max_len, self.width))
      x = x + pos[:inputs.shape[1]].astype(x.dtype)
    token_mask = None if mask is None else jnp.broadcast_to(mask[:, None], inputs.shape)
    domain_ids = None if domains is None else jnp.broadcast_to(domains[:, None], inputs.shape)
    block = functools.partial(common.Block, self.num_heads, self.mlp_dim, self.activation,
                              self.norm, causal=True, rope=self.positions == "rope",
                              dropout=self.dropout, dtype=self.dtype)
    x = common.run_blocks(block, self.num_layers, self.moe, self.mod, x,
                          deterministic=deterministic, token_ids=inputs, domain_ids=domain_ids,
                          token_mask=token_mask)
    x = common.NORMS[self.norm](dtype=self.dtype, name="final_norm")(x)
    return embed.attend(x).astype(jnp.float32)


def check_config(config, data_info) -> None:
  del data_info  # vocab_size and seq_len are set by the data pipeline
  common.check_config(config)
  check_choice("model", "norm", config.norm, tuple(common.NORMS))
  check_choice("model", "positions", config.positions, POSITIONS)
  head_dim = config.width // config.num_heads
  if config.positions == "rope" and head_dim % 2:
    raise ValueError(f"model.positions='rope' rotates pairs of dimensions, so the head dim "
                     f"model.width / model.num_heads = {head_dim} must be even")


def layer_plan(config, data_info) -> common.LayerPlan:
  """See moe_jax.models.layer_plan."""
  check_config(config, data_info)
  return common.LayerPlan(
      moe=common.moe_layers(config, causal=True, num_token_ids=data_info["vocab_size"],
                            num_domains=len(data_info.get("domains", ())) or None),
      mod=mod.routed_blocks(config, causal=True))


def from_config(config, data_info, plan: common.LayerPlan) -> Model:
  return Model(vocab_size=data_info["vocab_size"], max_len=data_info["seq_len"],
               num_layers=config.num_layers, width=config.width, num_heads=config.num_heads,
               mlp_dim=config.mlp_dim, activation=config.activation, norm=config.norm,
               positions=config.positions, dropout=config.dropout,
               dtype=common.DTYPES[config.dtype],
               moe=plan.moe, mod=plan.mod)


def flop_counts(config, data_info, plan: common.LayerPlan) -> dict:
  """See moe_jax.models.flop_counts; T = seq_len. The tied head adds no parameters."""
  seq_len, m = data_info["seq_len"], config.width
  counts = common.stack_counts(config, plan.moe, seq_len, config.norm, plan.mod)
  embedding = data_info["vocab_size"] * m + seq_len * m * (config.positions == "learned")
  counts["total_params"] += embedding
  counts["active_params"] += embedding
  head_flops = 2 * data_info["vocab_size"] * m  # the tied head's logits; the lookup is a gather
  return counts | {"embedding_params": embedding, "head_flops_per_token": head_flops}
