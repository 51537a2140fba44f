"""Vision Transformer classifier (Dosovitskiy et al. 2021) with optional MoE layers (V-MoE).

image [B,H,W,C] -> patches [B,T,M] (+ class token) + learned positions -> blocks (bidirectional,
LayerNorm) -> LayerNorm -> class token or mean over tokens [B,M] -> logits [B,K] float32.
The MoE layers get each token's position (class token 0, then patches in raster order) as the
token id of hash routing.
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

POOLINGS = ("cls", "mean")


class Model(nn.Module):
  """ViT; `moe` maps block index -> MoeLayer constructor (common.moe_layers), `mod`
  block index -> Mixture-of-Depths RoutedBlock constructor (mod.routed_blocks)."""
  num_classes: int
  num_layers: int
  width: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  activation: str = "gelu"
  pooling: str = "cls"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  moe: Dict[int, Callable[..., MoeLayer]] = dataclasses.field(default_factory=dict)
  mod: Dict[int, Callable[..., nn.Module]] = dataclasses.field(default_factory=dict)

  @nn.compact
  def __call__(self, image: Array, *, deterministic: bool,
               mask: Optional[Array] = None) -> Array:
    """image float32 [B,H,W,C], mask bool [B] (False: a padding example, routed by no MoE
    layer and counted in no routing loss or statistic) -> logits float32 [B, num_classes]."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(image)
    x = x.reshape(x.shape[0], -1, self.width)  # [B, T, M], patches in raster order
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype),
                           x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos.astype(x.dtype)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # token ids of hash routing
    token_mask = None if mask is None else jnp.broadcast_to(mask[:, None], x.shape[:2])
    block = functools.partial(common.Block, self.num_heads, self.mlp_dim, self.activation,
                              "layernorm", dropout=self.dropout, dtype=self.dtype)
    x = common.run_blocks(block, self.num_layers, self.moe, self.mod, x,
                          deterministic=deterministic, token_ids=positions, token_mask=token_mask)
    x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
    x = x[:, 0] if self.pooling == "cls" else x.mean(axis=1)
    # Zero-init head (big_vision): the initial loss is exactly log(num_classes).
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name="head")(x)
    return logits.astype(jnp.float32)


def check_config(config, data_info) -> None:
  common.check_config(config)
  check_choice("model", "pooling", config.pooling, POOLINGS)
  height, width, _ = data_info["image_shape"]
  if config.patch_size < 1 or height % config.patch_size or width % config.patch_size:
    raise ValueError(f"model.patch_size={config.patch_size} must divide the image size "
                     f"{height}x{width}")


def num_tokens(config, data_info) -> int:
  """T: patches per image, plus the class token."""
  height, width, _ = data_info["image_shape"]
  return (height // config.patch_size) * (width // config.patch_size) + (config.pooling == "cls")


def layer_plan(config, data_info) -> common.LayerPlan:
  """See moe_jax.models.layer_plan."""
  check_config(config, data_info)
  return common.LayerPlan(
      moe=common.moe_layers(config, causal=False, num_token_ids=num_tokens(config, data_info)),
      mod=mod.routed_blocks(config, causal=False))


def from_config(config, data_info, plan: common.LayerPlan) -> Model:
  return Model(num_classes=data_info["num_classes"], num_layers=config.num_layers,
               width=config.width, num_heads=config.num_heads, mlp_dim=config.mlp_dim,
               patch_size=config.patch_size, activation=config.activation,
               pooling=config.pooling, dropout=config.dropout,
               dtype=common.DTYPES[config.dtype],
               moe=plan.moe, mod=plan.mod)


def flop_counts(config, data_info, plan: common.LayerPlan) -> dict:
  """See moe_jax.models.flop_counts; T = patches (+1 class token)."""
  channels = data_info["image_shape"][-1]
  p, m, classes = config.patch_size, config.width, data_info["num_classes"]
  tokens = num_tokens(config, data_info)
  counts = common.stack_counts(config, plan.moe, tokens, "layernorm", plan.mod)
  # patch kernel and bias, positions, class token
  embedding = p * p * channels * m + m + tokens * m + m * (config.pooling == "cls")
  head = m * classes + classes
  counts["total_params"] += embedding + head
  counts["active_params"] += embedding + head
  patches = tokens - (config.pooling == "cls")
  head_flops = (patches * 2 * p * p * channels * m + 2 * m * classes) / tokens
  return counts | {"embedding_params": embedding, "head_flops_per_token": head_flops}
