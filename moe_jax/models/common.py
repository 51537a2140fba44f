"""What ViT and the LM share: the pre-norm Transformer block, self-attention (optionally rotary),
the placement of MoE layers, and the FLOP/parameter counts of the block stack.

Letters: B batch, T tokens per example, M width, N heads, D head dim (M / N), H hidden width.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax.core import FrozenDict

from moe_jax import routers
from moe_jax.dispatch import expert_matrices
from moe_jax.experts import ACTIVATIONS
from moe_jax.layers import DenseFFN, MoeLayer
from moe_jax.validation import check_choice

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
NORM_PARAMS_PER_WIDTH = {"layernorm": 2, "rmsnorm": 1}  # scale (+ bias)
# model.moe fields that place the MoE layers or pick the router; every other field is a MoeLayer
# argument, except the routers' settings blocks (model.moe.<router name>: the chosen router's
# becomes router_settings) and the ones the model sets itself (activation and dtype come from
# `model`, causal from the model kind, num_token_ids and num_domains from the data: what
# router='hash' and router='domain' route by).
_PLACEMENT_FIELDS = ("router", "router_module", "num_experts", "experts_per_layer", "every",
                     "layers", "first_dense_layers", "first_hash_layers", "granularity")
_SET_BY_MODEL = ("activation", "dtype", "causal", "num_token_ids", "num_domains",
                 "router_settings", "parent", "name")
MOE_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(MoeLayer)
                         if f.name not in _PLACEMENT_FIELDS + _SET_BY_MODEL)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What each block holds beyond attention and the dense FFN, derived once from the model config
  and the data (models.layer_plan): `moe` {block index: MoeLayer constructor} (moe_layers), `mod`
  {block index: Mixture-of-Depths RoutedBlock constructor} (mod.routed_blocks). The model is
  built from it, the FLOP counts price it, sharding checks its groups and the trace expects its
  choices, so none of them reads model.moe again."""
  moe: Dict[int, Callable[..., MoeLayer]]
  mod: Dict[int, Callable[..., nn.Module]]

  def moe_layers(self) -> Dict[int, MoeLayer]:
    """{block index: its MoeLayer, unbound}: the settings (num_experts, num_selected,
    resolved_group_size) without building the model."""
    return {index: make() for index, make in self.moe.items()}


def check_config(config) -> None:
  """Checks the fields both models read; one-line ValueErrors that name the field."""
  check_choice("model", "activation", config.activation, ACTIVATIONS)
  check_choice("model", "dtype", config.dtype, DTYPES)
  for name in ("num_layers", "width", "num_heads", "mlp_dim"):
    if config[name] < 1:
      raise ValueError(f"model.{name}={config[name]} must be >= 1")
  if config.width % config.num_heads:
    raise ValueError(f"model.num_heads={config.num_heads} must divide "
                     f"model.width={config.width}")


def moe_layer_indices(config) -> tuple:
  """0-based indices of the MoE layers: model.moe.layers if set, else every-1, 2*every-1, ...;
  then none among the first model.moe.first_dense_layers layers (maxtext's
  first_num_dense_layers)."""
  moe, num_layers = config.moe, config.num_layers
  routers.import_module(moe.get("router_module"))
  check_choice("model.moe", "router", moe.router, ("dense",) + routers.names())
  if moe.router == "dense":
    return ()
  if moe.layers:
    layers = tuple(sorted(set(moe.layers)))
    if not 0 <= layers[0] <= layers[-1] < num_layers:
      raise ValueError(f"model.moe.layers={tuple(moe.layers)} has an index outside "
                       f"[0, {num_layers}) (model.num_layers={num_layers})")
  elif moe.every < 1:
    raise ValueError(f"model.moe.every={moe.every} must be >= 1 (or list the layers in "
                     "model.moe.layers)")
  else:
    layers = tuple(range(moe.every - 1, num_layers, moe.every))
  first_dense = moe.get("first_dense_layers", 0)
  if first_dense < 0:
    raise ValueError(f"model.moe.first_dense_layers={first_dense} must be >= 0")
  layers = tuple(index for index in layers if index >= first_dense)
  if not layers:
    raise ValueError(f"model.moe.every={moe.every}, layers={tuple(moe.layers)} and "
                     f"first_dense_layers={first_dense} place no MoE layer among "
                     f"model.num_layers={num_layers}; use model.moe.router='dense' for none")
  return layers


def fine_grained(moe, num_experts: int) -> dict:
  """num_experts, expert_hidden_dim and k of a MoeLayer of `num_experts` experts under
  moe.granularity = m (DeepSeekMoE fine-grained experts): m x the experts, each of width
  expert_hidden_dim / m, and m x the router's k chosen unless moe.k sets the number chosen.
  Shared experts take the fine-grained width too. m = 1 changes nothing.
  """
  m, k = moe.get("granularity", 1), moe.get("k")
  if m < 1:
    raise ValueError(f"model.moe.granularity={m} must be >= 1")
  if m == 1:
    return dict(num_experts=num_experts, expert_hidden_dim=moe.expert_hidden_dim, k=k)
  default_k = routers.get(moe.router, "model.moe").default_k
  if default_k is None:
    raise ValueError(f"model.moe.granularity={m} splits the experts of tokens-choose routers; "
                     f"router={moe.router!r} chooses no k")
  if moe.expert_hidden_dim % m:
    raise ValueError(f"model.moe.granularity={m} must divide "
                     f"model.moe.expert_hidden_dim={moe.expert_hidden_dim}")
  return dict(num_experts=num_experts * m, expert_hidden_dim=moe.expert_hidden_dim // m,
              k=default_k * m if k is None else k)


def check_domain_labels(config, data_info) -> None:
  """A one-line error for a router that routes by domain (uses_domains) on data without domain
  labels (data_info["domains"] empty or absent)."""
  router_cls = routers.REGISTRY.get(config.moe.router)  # unknown: the model's check says so
  if router_cls is not None and router_cls.uses_domains and not data_info.get("domains"):
    raise ValueError(f"model.moe.router={config.moe.router!r} routes each sequence to its domain's "
                     f"experts, but data {data_info['name']!r} has no domain labels; use the LM "
                     "with data.name='multidomain_bytes'")


def moe_layers(config, *, causal: bool, num_token_ids: Optional[int] = None,
               num_domains: Optional[int] = None) -> Dict[int, Callable[..., MoeLayer]]:
  """{layer index: MoeLayer constructor} for config.moe ({} for router='dense').

  num_token_ids: the range of the token ids the model passes to its MoE layers (hash routing).
  num_domains: the domains of the data's labels (domain routing); None: the data has none.

  The constructors are partials (not MoeLayer instances, which Flax would adopt as children of
  whichever module holds them). Each is called once here so that MoeLayer's own validation,
  e.g. expert choice in a causal decoder, raises now rather than when the model is traced.
  """
  indices = moe_layer_indices(config)
  if not indices:
    return {}
  # Router settings blocks are sub-configs: a saved config may hold blocks of routers that this
  # process has not registered (any block but the chosen router's is unused).
  settings = {key: value for key, value in config.moe.items()
              if key not in _PLACEMENT_FIELDS + ("expert_hidden_dim", "k")
              and not hasattr(value, "keys")}
  for key in settings:
    if key not in MOE_LAYER_FIELDS:
      raise ValueError(f"model.moe.{key} is not a MoeLayer setting here; allowed: "
                       f"{', '.join(MOE_LAYER_FIELDS)} (activation and dtype come from model)")
  router_settings = config.moe.get(config.moe.router, {})
  if hasattr(router_settings, "to_dict"):
    router_settings = router_settings.to_dict()
  # Per-layer counts: a non-empty experts_per_layer, or a tuple num_experts (a ConfigDict field
  # keeps its type, so a config whose default num_experts is an int sets experts_per_layer).
  field = "experts_per_layer" if config.moe.get("experts_per_layer") else "num_experts"
  num_experts = config.moe[field]
  if isinstance(num_experts, int):
    num_experts = (num_experts,) * len(indices)
  elif len(num_experts) != len(indices):
    raise ValueError(f"model.moe.{field} has {len(num_experts)} entries but there are "
                     f"{len(indices)} MoE layers {indices}")
  hash_layers = config.moe.get("first_hash_layers", 0)
  granular = config.moe.get("granularity", 1) != 1
  if not 0 <= hash_layers <= len(indices) or (hash_layers and granular):
    raise ValueError(f"model.moe.first_hash_layers={hash_layers} must be in [0, {len(indices)}"
                     f"] (the MoE layers), with model.moe.granularity=1")
  layers = {}
  for position, (index, experts) in enumerate(zip(indices, num_experts)):
    layer = dict(router=config.moe.router, router_settings=FrozenDict(router_settings),
                 **fine_grained(config.moe, experts), **settings)
    if position < hash_layers:  # maxtext's first_num_hash_layers: hash routing, nothing learned
      layer.update(router="hash", router_settings=FrozenDict(), k=None, jitter_eps=0.0,
                   noise_std=0.0, batch_prioritized=False)
    layers[index] = functools.partial(MoeLayer, activation=config.activation,
                                      dtype=DTYPES[config.dtype], causal=causal,
                                      num_token_ids=num_token_ids, num_domains=num_domains,
                                      **layer)
    layers[index]()  # validates
  return layers


def rope(x: Array, positions, max_wavelength: float = 10_000.0) -> Array:
  """Rotary position embedding (Su et al. 2021) on x [..., T, N, D] at static positions [T].

  Rotates the pairs (x_i, x_{i+D/2}) by positions * max_wavelength^(-2i/D) (the half-split
  layout of GPT-NeoX), so that rope(q, m) . rope(k, n) depends on m - n only. The sin and cos
  tables are computed here in float64 numpy and enter the graph as float32 constants: computed
  with jnp, XLA:CPU fused sin and cos into the rotation and evaluated them for every element (the
  LM's train step ran 7% faster with constants).
  """
  half = x.shape[-1] // 2
  inv_freq = max_wavelength ** (-np.arange(half, dtype=np.float64) / half)  # [D/2]
  angle = np.asarray(positions, np.float64)[:, None, None] * inv_freq  # [T, 1, D/2] over heads
  sin, cos = (jnp.asarray(table, jnp.float32) for table in (np.sin(angle), np.cos(angle)))
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, causal: bool) -> Array:
  """Softmax attention of q, k, v [B,T,N,D] -> [B,T,N,D], scaled by 1 / sqrt(D).

  The same math as the XLA form of jax.nn.dot_product_attention (float32 scores and softmax,
  weights cast back to v's dtype), with the heads moved ahead of the tokens first, so the two
  batched matmuls and the softmax run on contiguous [T, S] blocks: XLA:CPU's train step of the
  default ViT ran 10% faster than with jax.nn.dot_product_attention. SelfAttention uses it on CPU.
  """
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B,N,T,D]
  scores = jnp.einsum("bntd,bnsd->bnts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(q.shape[-1]))
  if causal:
    length = q.shape[2]
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bnts,bnsd->bntd", weights, v), 1, 2)


class SelfAttention(nn.Module):
  """Multi-head self-attention: x [B,T,M] -> [B,T,M].

  No biases (like FeedForward), no dropout on the attention weights. The projections see the
  tokens as one [B*T, M] matrix (see experts.FeedForward for why).
  """
  num_heads: int
  causal: bool = False
  rope: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, length, width = x.shape
    dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=self.dtype)
    heads = (self.num_heads, width // self.num_heads)
    rows = x.reshape(-1, width)  # [B*T, M]
    q, k, v = (dense(heads, name=name)(rows).reshape(batch, length, *heads)
               for name in ("query", "key", "value"))  # [B,T,N,D]
    if self.rope:
      positions = np.arange(length)
      q, k = rope(q, positions), rope(k, positions)
    if jax.default_backend() == "cpu":
      out = attention(q, k, v, self.causal)
    else:  # the same math; JAX may pick cuDNN's fused attention on GPU
      out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    out = out.reshape(-1, *heads)  # [B*T,N,D]
    return dense(width, axis=(-2, -1), name="out")(out).reshape(batch, length, width)


class Block(nn.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then + ffn(norm(.)). x [B,T,M] -> [B,T,M].

  The FFN is a DenseFFN of width mlp_dim named 'mlp', or, when `moe` is set, that MoeLayer named
  'moe' (so per-layer routing stats sit under 'block_<i>/moe'), given token_ids [B,T] (hash
  routing), domain_ids [B,T] (domain routing: each token's sequence's label) and token_mask
  [B,T] (padding is never routed and counts in no loss or statistic).
  Dropout applies to both residual branches. Returns (x, router_logits): a MoE layer whose
  router carries_logits (MoE++'s gating residual) reads router_logits [B,T,E'], the previous MoE
  layer's, and returns its own; every other block passes them on unchanged (None before the
  first such layer).
  """
  num_heads: int
  mlp_dim: int
  activation: str
  norm: str
  moe: Optional[Callable[..., MoeLayer]] = None
  causal: bool = False
  rope: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool, token_ids: Optional[Array] = None,
               domain_ids: Optional[Array] = None, token_mask: Optional[Array] = None,
               router_logits: Optional[Array] = None):
    norm = functools.partial(NORMS[self.norm], dtype=self.dtype)
    drop = nn.Dropout(self.dropout, deterministic=deterministic)  # no rng drawn at rate 0
    y = norm(name="attn_norm")(x)
    y = SelfAttention(self.num_heads, self.causal, self.rope, self.dtype, name="attn")(y)
    x = x + drop(y)
    y = norm(name="ffn_norm")(x)
    if self.moe is None:
      ffn = DenseFFN(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")
    else:
      ffn = self.moe(name="moe")
    call = functools.partial(ffn, y, token_mask, token_ids=token_ids, domain_ids=domain_ids,
                             deterministic=deterministic)
    if self.moe is not None and ffn.carries_logits:
      y, router_logits = call(router_logits=router_logits)
    else:
      y = call()
    return x + drop(y), router_logits


def run_blocks(block: Callable[..., Block], num_layers: int,
               moe: Dict[int, Callable[..., MoeLayer]], mod: Dict[int, Callable[..., nn.Module]],
               x: Array, **inputs) -> Array:
  """x [B,T,M] through blocks 'block_0' .. 'block_{L-1}' of the calling module: block(moe=...) with
  layer i's MoE layer (moe.get(i)), wrapped by mod[i] where Mixture-of-Depths routes it; the
  router logits carried from block to block (MoE++'s gating residual). inputs: Block's keywords
  (deterministic, token_ids, domain_ids, token_mask)."""
  router_logits = None
  for i in range(num_layers):
    make = functools.partial(block, moe=moe.get(i))
    if i in mod:
      make = functools.partial(mod[i], make)
    x, router_logits = make(name=f"block_{i}")(x, router_logits=router_logits, **inputs)
  return x


def stack_counts(config, moe: Dict[int, Callable[..., MoeLayer]], seq_len: int,
                 norm: str, routed: Optional[Dict[int, Callable[..., Any]]] = None) -> dict:
  """FLOPs per token and parameters of the blocks plus the final norm (formulas: models/).

  routed: {index: mod.RoutedBlock constructor}: such a block costs its router and predictor plus
  K / T of the block at K tokens (Mixture-of-Depths).
  """
  routed = routed or {}
  width = config.width
  matrices = expert_matrices(config.activation)  # weight matrices of one FFN
  norm_params = NORM_PARAMS_PER_WIDTH[norm] * width
  flops, params, idle = 0, norm_params, 0  # idle: expert params a token does not touch
  for index in range(config.num_layers):
    before, tokens = flops, seq_len
    if index in routed:
      router_params, router_flops, tokens = routed[index](None).cost(width, seq_len)
      params += router_params
    attention = 4 * width * width  # query, key, value, out
    flops += 2 * attention + 4 * tokens * width  # projections; q.k scores and weighted values
    params += attention + 2 * norm_params
    if index in moe:
      layer = moe[index]()
      expert = matrices * width * layer.expert_hidden_dim
      # The router's parameters, FLOPs and mean experts per token: k, or what its capacity
      # gives (expert choice: its capacity factor; soft: slots per token E C / S).
      router, router_flops, k_eff = layer.router_cost(width)
      shared = layer.num_shared_experts * expert + layer.shared_expert_gate * width  # w_g [M,1]
      residual = layer.residual * (expert + 2 * width)  # dense MLP, coefficient kernel [M, 2]
      flops += router_flops + 2 * (k_eff * expert + shared + residual)
      params += router + layer.num_experts * expert + shared + residual
      params += 2 * layer.residual  # the coefficient's bias
      idle += (layer.num_experts - k_eff) * expert
    else:
      flops += 2 * matrices * width * config.mlp_dim
      params += matrices * width * config.mlp_dim
    if index in routed:  # the block's FLOPs for K of the T tokens
      flops = before + (flops - before) * tokens / seq_len + router_flops
  return {"active_flops_per_token": flops, "total_params": params,
          "active_params": params - idle}
