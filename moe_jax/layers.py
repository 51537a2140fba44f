"""The MoE layer and its dense baseline (letters: see routing.py).

MoeLayer = group tokens -> route (float32) -> dispatch -> experts -> combine -> ungroup, plus
optional always-on shared experts. It sows, for the training loop:
  'losses':        load_balance_loss, z_loss   (float32 scalars)
  'routing_stats': stats                       (dict from metrics.routing_statistics)
Read them with `model.apply(..., mutable=['losses', 'routing_stats'])`. The 'loss_free' router
also keeps a float32 bias in the 'router_bias' collection: state, not parameters, updated by a
training call that lists the collection as mutable (routing.LossFreeRouter).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import sharding
from moe_jax.metrics import routing_statistics
from moe_jax.routing import (ROUTER_SCORES, SECOND_EXPERT_POLICIES, BaseRouter,
                             ExpertChoiceRouter, GShardRouter, HashRouter, LossFreeRouter,
                             RandomRouter, SoftMoeRouter, SwitchRouter, TopKRouter, VMoeRouter,
                             expert_capacity)

Array = jax.Array

ACTIVATIONS = ("gelu", "relu", "swiglu")
# Router name -> (module, default k). Expert choice and Soft MoE have no k: their capacity factor
# sets the mean number of experts per token (soft: slots per token).
ROUTERS = {
    "switch": (SwitchRouter, 1),
    "gshard": (GShardRouter, 2),
    "topk": (TopKRouter, 2),
    "expert_choice": (ExpertChoiceRouter, None),
    "vmoe": (VMoeRouter, 2),
    "soft": (SoftMoeRouter, None),
    "hash": (HashRouter, 1),
    "random": (RandomRouter, 1),
    "base": (BaseRouter, 1),
    "loss_free": (LossFreeRouter, 2),
}
# Routers whose assignment of a token depends on later tokens of its group: refused when causal.
NON_CAUSAL_ROUTERS = ("expert_choice", "soft", "base")
# Routers that rank the top-k of a learned softmax, where k and batch_prioritized apply.
TOKENS_CHOOSE_ROUTERS = ("switch", "gshard", "topk", "vmoe", "loss_free")
# Routers that fill expert slots themselves, so a token has no list of choices: no dropless path.
SLOT_ROUTERS = ("expert_choice", "soft")
# Routers without a learned softmax over experts: logit jitter and noise do not apply.
UNNOISED_ROUTERS = ("soft", "hash", "random")


def _allowed(values) -> str:
  return ", ".join(map(repr, values))


def check_choice(owner: str, field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{owner}.{field}={value!r} is unknown; allowed: {_allowed(allowed)}")


def _activate(activation: str, *pre: Array) -> Array:
  """Hidden units from the input projections: (h,) for gelu/relu, (gate, up) for swiglu."""
  if activation == "swiglu":
    return nn.silu(pre[0]) * pre[1]
  return (nn.gelu if activation == "gelu" else nn.relu)(pre[0])


def _mlp(x: Array, kernels, activation: str, spec_in: str, spec_out: str, dtype) -> Array:
  """The MLP on x with kernels (w_in,) or (w_gate, w_up) for swiglu, then w_out."""
  x = x.astype(dtype)
  hidden = _activate(activation, *(jnp.einsum(spec_in, x, k.astype(dtype)) for k in kernels[:-1]))
  return jnp.einsum(spec_out, hidden, kernels[-1].astype(dtype))


def _experts_mlp(buffers: Array, *kernels, activation: str, dtype) -> Array:
  """E' experts on their slots: buffers [G,E',C,M], kernels [E',M,H].., [E',H,M] -> [G,E',C,M].

  One [G*C, M] x [M, H] matmul per expert: with G as an outer batch dimension XLA:CPU's backward
  ran 2.3x slower (measured at G=32, C=80, M=512, H=2048).
  """
  num_groups, num_experts, capacity, model_dim = buffers.shape
  tokens = jnp.swapaxes(buffers, 0, 1).reshape(num_experts, -1, model_dim)  # [E', G*C, M]
  y = _mlp(tokens, kernels, activation, "etm,emh->eth", "eth,ehm->etm", dtype)
  return jnp.swapaxes(y.reshape(num_experts, num_groups, capacity, model_dim), 0, 1)


# Chunk sizes of the CPU dropless form: each expert's run of rows is covered by chunks of
# CHUNK_ROWS, then chunks of smaller powers of two down to MIN_CHUNK_ROWS (_over_chunks). Larger
# chunks amortize the matmuls' weight packing: at T = 8192, M = 512, H = 2048, E = 8, top-2 the
# experts' forward+backward ran at 72%, 74%, 76%, 75% of the matmul peak with 256, 512, 1024 and
# 2048-row chunks (one interleaved run, 2 XLA:CPU cores); at E = 64 all four ran at 61%.
CHUNK_ROWS = 1024
MIN_CHUNK_ROWS = 32


def chunk_sizes(num_pairs: int) -> tuple:
  """The chunk sizes for N (token, choice) pairs, largest first: (CHUNK_ROWS, ..., MIN_CHUNK_ROWS),
  none larger than N. The rows must extend past the pairs by the largest (a last chunk may
  overhang)."""
  largest = min(CHUNK_ROWS, 2 ** int(math.log2(max(num_pairs, 1))))
  sizes = [largest]
  while sizes[-1] > MIN_CHUNK_ROWS:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def _over_chunks(count: Array, sizes: tuple, body, carry, first_apart: bool = False):
  """Runs body(carry, at, size, tail, first) over rows [0, count) in chunks of the static sizes.

  A loop of full chunks of the largest size; then, for the rest, each size at most once (largest
  first): a full chunk if the rest holds one, else, when the rest fills more than 3/4 of the size
  (or any rest, after the smallest), a last chunk ending at `count` that overlaps rows done before
  (or, for a run shorter than the size, overhangs into the rows after it). So at most a quarter
  of a chunk, or one smallest chunk, is wasted per expert, with few small chunks.
  tail = (begin, end): only rows begin <= at + i < end are this chunk's own. The optional chunks
  are fori_loops of 0 or 1 trips: lax.cond made XLA copy the carried row buffers per branch.
  first_apart: each loop runs its first trip apart, with the static flag `first` True when it is
  the run's first chunk, so the body can write what it would otherwise add to zeros (the
  backward's weight gradients). Without it, `first` is always False.
  """

  def run(carry, trips, at, size, tail, done):
    """body over `trips` chunks at rows at, at + size, ...; `done` rows ran before."""
    # "+ i * size" (i always 0 in the optional loops): a body that ignored the index would be
    # hoisted out of its loop by XLA's loop-invariant code motion, and run even when it does not.
    step = lambda first: lambda i, c: body(c, at + i * size, size, tail, first)
    leads = 0
    if first_apart:
      leads = ((done == 0) & (trips > 0)).astype(jnp.int32)
      carry = jax.lax.fori_loop(0, leads, step(True), carry)
    return jax.lax.fori_loop(leads, trips, step(False), carry)

  trips = count // sizes[0]
  carry = run(carry, trips, 0, sizes[0], None, 0)
  rest = count - trips * sizes[0]
  for size, can_be_full in [(size, True) for size in sizes] + [(sizes[-1], False)]:
    full = (rest >= size) & can_be_full
    last = ~full & (rest > (3 * size) // 4 if can_be_full else rest > 0)
    at = jnp.where(full, count - rest, jnp.maximum(count - size, 0))
    carry = run(carry, (full | last).astype(jnp.int32), at, size, (count - rest, count),
                count - rest)
    rest = jnp.where(full, rest - size, jnp.where(last, 0, rest))
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_mlp(activation: str, sizes: tuple, rows: Array, group_sizes: Array,
                 *kernels: Array) -> Array:
  """Each expert on its run of rows: rows [R,M] sorted by expert, group_sizes [E], kernels
  [E,M,H].., [E,H,M] -> [R,M]; sizes = chunk_sizes(N), and R >= N + sizes[0] >= sum(group_sizes)
  + sizes[0]. Rows after sum(group_sizes) are not computed (left arbitrary).

  A scan over experts (each expert's weights are read once) and a loop over static-size chunks
  of its rows (_over_chunks). An expert's overhanging last chunk writes arbitrary values into the
  next expert's rows, which that expert overwrites later in the scan. The backward is written by
  hand: each expert's weight gradient is accumulated over its chunks and leaves as a scan output,
  where autodiff would add a full [E,M,H] cotangent per chunk.
  """
  return _chunked_mlp_fwd(activation, sizes, rows, group_sizes, *kernels)[0]


def _chunked_mlp_fwd(activation, sizes, rows, group_sizes, *kernels):

  def expert(carry, inputs):
    start, count, *weights = inputs

    def chunk(carry, offset, size, tail, first):
      del tail, first  # rows that are not this chunk's own get overwritten by their own chunk later
      out, pre_buffers = carry
      at = start + offset
      x = jax.lax.dynamic_slice_in_dim(rows, at, size)
      pre = tuple(x @ w for w in weights[:-1])
      y = _activate(activation, *pre) @ weights[-1]
      return (jax.lax.dynamic_update_slice_in_dim(out, y, at, 0),
              tuple(jax.lax.dynamic_update_slice_in_dim(b, p, at, 0)
                    for b, p in zip(pre_buffers, pre)))

    return _over_chunks(count, sizes, chunk, carry), None

  # The pre-activations are kept for the backward (recomputing them costs more, measured).
  init = (jnp.zeros_like(rows), tuple(jnp.zeros((rows.shape[0], w.shape[-1]), rows.dtype)
                                      for w in kernels[:-1]))
  (out, pre), _ = jax.lax.scan(expert, init,
                              (dispatch_lib.run_starts(group_sizes), group_sizes, *kernels))
  return out, (rows, group_sizes, kernels, pre)


def _chunked_mlp_bwd(activation, sizes, residuals, out_grad):
  rows, group_sizes, kernels, pre_buffers = residuals

  def expert(dx, inputs):
    start, count, *weights = inputs

    def chunk(carry, offset, size, tail, first):
      dx, grads = carry
      at = start + offset
      x = jax.lax.dynamic_slice_in_dim(rows, at, size)
      dy = jax.lax.dynamic_slice_in_dim(out_grad, at, size)
      if tail is not None:  # rows of other chunks or experts: their gradient is counted there
        row = offset + jnp.arange(size)[:, None]
        own = (row >= tail[0]) & (row < tail[1])
        dy = jnp.where(own, dy, 0)
      pre = tuple(jax.lax.dynamic_slice_in_dim(b, at, size) for b in pre_buffers)
      hidden, activate_vjp = jax.vjp(functools.partial(_activate, activation), *pre)
      d_pre = activate_vjp(dy @ weights[-1].T)
      dx_chunk = sum(d @ w.T for d, w in zip(d_pre, weights[:-1]))
      if tail is not None:  # keep what the full chunks wrote into the overlapped rows
        dx_chunk = jnp.where(own, dx_chunk, jax.lax.dynamic_slice_in_dim(dx, at, size))
      dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_chunk, at, 0)
      updates = tuple(u.astype(jnp.float32) for u in [x.T @ d for d in d_pre] + [hidden.T @ dy])
      # the run's first chunk writes its update: adding it to zeros cost 5% at E = 64 (measured)
      return dx, updates if first else tuple(g + u for g, u in zip(grads, updates))

    # float32 accumulators: a bf16 sum over many chunks would lose the small updates.
    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    return _over_chunks(count, sizes, chunk, (dx, zeros), first_apart=True)

  dx, grads = jax.lax.scan(expert, jnp.zeros_like(rows),
                           (dispatch_lib.run_starts(group_sizes), group_sizes, *kernels))
  return (dx, None, *(g.astype(k.dtype) for g, k in zip(grads, kernels)))


_chunked_mlp.defvjp(_chunked_mlp_fwd, _chunked_mlp_bwd)


def _dropless_experts_mlp(rows: Array, layout: dispatch_lib.DroplessLayout, *kernels,
                          activation: str, dtype, form: str) -> Array:
  """The experts on rows sorted by expert: rows [R,M], kernels [E,M,H].., [E,H,M] -> [R,M]."""
  rows = rows.astype(dtype)
  if form == "blocks":
    # Rows in blocks [R/B,B,M]; each block gathers its expert's weights [R/B,M,H] in float32, so
    # the backward sums the blocks' weight gradients in float32.
    kernels = [k[layout.block_expert].astype(dtype) for k in kernels]
    blocks = rows.reshape(kernels[0].shape[0], -1, rows.shape[-1])
    hidden = _activate(activation, *(jnp.einsum("brm,bmh->brh", blocks, k) for k in kernels[:-1]))
    return jnp.einsum("brh,bhm->brm", hidden, kernels[-1]).reshape(rows.shape)
  kernels = [k.astype(dtype) for k in kernels]
  if form == "chunks":
    sizes = chunk_sizes(layout.pair_row.size)
    return _chunked_mlp(activation, sizes, rows, layout.group_sizes, *kernels)
  ragged = lambda x, k: jax.lax.ragged_dot(x, k, layout.group_sizes)
  hidden = _activate(activation, *(ragged(rows, k) for k in kernels[:-1]))
  return ragged(hidden, kernels[-1])


class FeedForward(nn.Module):
  """Two-layer MLP, or E of them stacked when num_experts is set.

  Dense: x [..., M] -> [..., M] with wi [M,H], wo [H,M].
  Experts: x [G,E,C,M] -> [G,E,C,M] with wi [E,M,H], wo [E,H,M] (swiglu: wi_gate and wi_up),
  run expert-parallel by `expert_parallel` (see sharding.run_experts); or, given a dropless
  `layout`, x [R,M] rows sorted by expert -> [R,M] in `dropless_form` (not expert-parallel).
  Parameters are float32 with logical axes ('expert',) 'embed', 'mlp'; the matmuls run in `dtype`.
  """
  hidden_dim: int
  activation: str = "gelu"
  num_experts: Optional[int] = None
  dtype: Any = jnp.float32
  expert_parallel: str = "none"
  dropless_form: str = "chunks"

  @nn.compact
  def __call__(self, x: Array, layout: Optional[dispatch_lib.DroplessLayout] = None) -> Array:
    model_dim = x.shape[-1]
    lead, axes = ((), ()) if self.num_experts is None else ((self.num_experts,), ("expert",))
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=-2, out_axis=-1)

    def kernel(name, shape, names):
      return self.param(name, nn.with_logical_partitioning(init, axes + names),
                        lead + shape, jnp.float32)

    names_in = ("wi_gate", "wi_up") if self.activation == "swiglu" else ("wi",)
    kernels = [kernel(n, (model_dim, self.hidden_dim), ("embed", "mlp")) for n in names_in]
    kernels.append(kernel("wo", (self.hidden_dim, model_dim), ("mlp", "embed")))
    if self.num_experts is None:
      # Tokens as one [T, M] matrix: with [B, T, M] operands XLA:CPU transposes the hidden
      # gradient for the weight gradients (fwd+bwd 2.3x slower at B=128, T=50, M=128, H=512).
      y = _mlp(x.reshape(-1, model_dim), kernels, self.activation, "tm,mh->th", "th,hm->tm",
               self.dtype)
      return y.reshape(x.shape)
    if layout is not None:
      mesh = jax.sharding.get_abstract_mesh()
      if (self.expert_parallel != "none" and not mesh.empty
          and dict(mesh.shape).get("expert", 1) > 1):
        raise ValueError(f"dispatch_path='dropless' does not run expert-parallel "
                         f"(expert_parallel={self.expert_parallel!r} on a mesh with expert axis "
                         f"{dict(mesh.shape)['expert']}); use 'einsum' or 'index' there")
      return _dropless_experts_mlp(x, layout, *kernels, activation=self.activation,
                                   dtype=self.dtype, form=self.dropless_form)
    expert_fn = functools.partial(_experts_mlp, activation=self.activation, dtype=self.dtype)
    return sharding.run_experts(expert_fn, x, kernels, self.expert_parallel)


class DenseFFN(nn.Module):
  """Dense baseline with MoeLayer's interface: x [..., M] -> [..., M]."""
  hidden_dim: int
  activation: str = "gelu"
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_choice("DenseFFN", "activation", self.activation, ACTIVATIONS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None, *,
               token_ids: Optional[Array] = None, deterministic: bool = False) -> Array:
    del token_mask, token_ids, deterministic  # same signature as MoeLayer
    return FeedForward(self.hidden_dim, self.activation, dtype=self.dtype, name="mlp")(x)


class MoeLayer(nn.Module):
  """Mixture-of-Experts feed-forward layer: x [..., M] -> [..., M].

  Attributes:
    num_experts: E.
    expert_hidden_dim: H of each expert.
    router: a name in ROUTERS: 'switch' | 'gshard' | 'topk' | 'expert_choice' | 'vmoe' (noisy
      top-k) | 'soft' (Soft MoE) | 'hash' | 'random' | 'base' (BASE layers) | 'loss_free'
      (DeepSeek's auxiliary-loss-free balancing).
    k: choices per token (default: gshard, topk, vmoe, loss_free 2, the others 1; not used by
      expert_choice and soft).
    capacity_factor: cf in training; eval_capacity_factor when deterministic. For expert choice it
      is the mean number of experts per token (C = S cf / E). For soft it sets the slots per
      expert C = max(min_capacity, ceil(cf S / E)) with the configured group_size S (at most S),
      in training and evaluation alike, since the slot parameters have that shape; the mean
      slots per token is then E C / S. BASE uses C = S / E in training (exactly balanced).
    min_capacity: lower bound on C (C = max(min_capacity, ceil(k cf S / E)), at most S).
    group_size: S, tokens routed together (effective S = min(S, number of tokens)); None picks
      it from the einsum cost model (dispatch.auto_group_size), at least min_capacity E / (k cf)
      so that cf, not min_capacity, sets the capacity.
    dispatch_path: 'index' (gathers; the default) or 'einsum' (dense masks), same result, index
      the faster on XLA:CPU (the default ViT's MoE train steps 1.15-1.23x, BENCHMARKS.md); or
      'dropless' (no capacity: every choice is processed; tokens-choose routers only, not
      expert-parallel).
    dropless_form: 'ragged_dot' | 'chunks' | 'blocks' for the dropless path; None picks by backend
      (dispatch.default_dropless_form). 'chunks' (the CPU default) has no forward-mode autodiff
      (jax.jvp, Hessian-vector products: JAX refuses its custom_vjp); the others and the einsum
      and index paths have it.
    activation: 'gelu' | 'relu' | 'swiglu'.
    num_shared_experts: always-on experts of width H added to the output (DeepSeekMoE).
    residual: Residual-MoE (PR-MoE, Rajbhandari et al. 2022), as DeepSpeed implements it: a dense
      MLP of width H beside the experts; output = c_0 * MoE(x) + c_1 * MLP(x) with a learned
      per-token c = softmax(x W_c + b_c) over 2. (The paper's plain sum MLP(x) + MoE(x) is
      num_shared_experts=1 instead.)
    dtype: compute dtype of the experts (router and losses stay float32).
    router_init_scale, jitter_eps, noise_std, batch_prioritized: see routing.Router.
    second_expert_policy: gshard only, 'random' (paper) or 'all'.
    router_scores: loss_free only: 'softmax' or 'sigmoid' (DeepSeek-V3) scores.
    bias_update_rate: loss_free only: u in b += u * sign(mean load - load) per training step.
    causal: the layer sits in a causal decoder; routers that read future tokens are refused.
    num_token_ids: the range of the token_ids that router='hash' routes by (set by the model: LM
      vocabulary size, ViT tokens per image).
    expert_parallel: 'none' | 'gspmd' | 'shard_map': how experts split over the mesh's expert
      axis (see sharding.py); acts only under `jax.set_mesh`.
  """
  num_experts: int
  expert_hidden_dim: int
  router: str = "switch"
  k: Optional[int] = None
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: Optional[int] = None
  dispatch_path: str = "index"
  dropless_form: Optional[str] = None
  activation: str = "gelu"
  num_shared_experts: int = 0
  residual: bool = False
  dtype: Any = jnp.float32
  router_init_scale: float = 0.1
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  batch_prioritized: bool = False
  second_expert_policy: str = "random"
  router_scores: str = "softmax"
  bias_update_rate: float = 1e-3
  causal: bool = False
  expert_parallel: str = "none"
  num_token_ids: Optional[int] = None

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self):
    name = "MoeLayer"
    check_choice(name, "router", self.router, ROUTERS)
    check_choice(name, "dispatch_path", self.dispatch_path, dispatch_lib.DISPATCH_PATHS)
    if self.dropless_form is not None:
      check_choice(name, "dropless_form", self.dropless_form, dispatch_lib.DROPLESS_FORMS)
    check_choice(name, "activation", self.activation, ACTIVATIONS)
    check_choice(name, "expert_parallel", self.expert_parallel, sharding.EXPERT_PARALLEL)
    check_choice(name, "second_expert_policy", self.second_expert_policy,
                  SECOND_EXPERT_POLICIES)
    check_choice(name, "router_scores", self.router_scores, ROUTER_SCORES)
    if self.router_scores != "softmax" and self.router != "loss_free":
      raise ValueError(f"{name}.router_scores={self.router_scores!r} applies to "
                       f"router='loss_free' only (router={self.router!r} routes by softmax)")
    if self.bias_update_rate < 0:
      raise ValueError(f"{name}.bias_update_rate={self.bias_update_rate} must be >= 0")
    for field in ("num_experts", "expert_hidden_dim", "group_size", "min_capacity"):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise ValueError(f"{name}.{field}={getattr(self, field)} must be a positive integer")
    for field in ("capacity_factor", "eval_capacity_factor"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{name}.{field}={getattr(self, field)} must be > 0")
    if self.num_shared_experts < 0:
      raise ValueError(f"{name}.num_shared_experts={self.num_shared_experts} must be >= 0")
    if self.jitter_eps < 0 or self.noise_std < 0:
      raise ValueError(f"{name}.jitter_eps={self.jitter_eps} and noise_std={self.noise_std} "
                       "must be >= 0")
    if self.causal and self.router in NON_CAUSAL_ROUTERS:
      causal_safe = [r for r in ROUTERS if r not in NON_CAUSAL_ROUTERS]
      raise ValueError(f"{name}.router={self.router!r} reads future tokens and is invalid in a "
                       f"causal decoder; allowed there: {_allowed(causal_safe)}")
    if self.batch_prioritized and self.router not in TOKENS_CHOOSE_ROUTERS:
      raise ValueError(f"{name}.batch_prioritized applies to the routers "
                       f"{_allowed(TOKENS_CHOOSE_ROUTERS)}, not router={self.router!r}")
    if self.router in UNNOISED_ROUTERS and (self.jitter_eps or self.noise_std):
      raise ValueError(f"{name}.jitter_eps={self.jitter_eps} and noise_std={self.noise_std} "
                       f"must be 0 for router={self.router!r} (no learned softmax over experts)")
    if self.router == "vmoe" and self.noise_std <= 0:
      raise ValueError(f"{name}.noise_std={self.noise_std} must be > 0 for router='vmoe' (its "
                       f"load loss is a probability under that noise; the paper: 1 / num_experts "
                       f"= {1 / self.num_experts:g})")
    if self.dispatch_path == "dropless" and self.router in SLOT_ROUTERS:
      raise ValueError(f"{name}.dispatch_path='dropless' needs a router whose tokens choose "
                       f"their experts, not router={self.router!r}; allowed: "
                       f"{_allowed([r for r in ROUTERS if r not in SLOT_ROUTERS])}")
    if self.router in ("soft", "base") and self.group_size is None:
      raise ValueError(f"{name}.group_size=None (automatic) does not suit router="
                       f"{self.router!r}; set it (soft: its slot parameters are sized by it; "
                       "base: a multiple of num_experts)")
    if self.router == "base" and self.group_size % self.num_experts:
      raise ValueError(f"{name}.group_size={self.group_size} must be a multiple of "
                       f"num_experts={self.num_experts} for router='base' (balanced assignment)")
    if ROUTERS[self.router][1] is None:
      if self.k is not None:
        raise ValueError(f"{name}.k={self.k} is not used by router={self.router!r}; set "
                         "capacity_factor (mean experts per token) instead")
      return
    k = self.num_selected
    if not 1 <= k <= self.num_experts:
      raise ValueError(f"{name}.k={k} must be in [1, num_experts={self.num_experts}]")
    if ROUTERS[self.router][1] == 1 and k != 1:
      raise ValueError(f"{name}.k={k}: router={self.router!r} is top-1; use router='topk' for "
                       "k > 1")
    if self.router == "gshard" and k != 2:
      raise ValueError(f"{name}.k={k}: router='gshard' is top-2; use router='topk' for k != 2")
    if self.causal and self.batch_prioritized:
      raise ValueError(f"{name}.batch_prioritized orders tokens by probability across the "
                       "group and reads future tokens; not allowed with causal=True")

  @property
  def num_selected(self) -> int:
    """k for tokens-choose routers; 1 for expert choice and soft (capacity formula k = 1)."""
    if self.k is not None:  # k=0 is an error (_validate), not "the router's default"
      return self.k
    return ROUTERS[self.router][1] or 1

  def resolved_group_size(self, num_tokens: int) -> int:
    """S for a batch of `num_tokens` tokens: group_size, or the auto choice when it is None."""
    if self.group_size is not None:
      return self.group_size
    # Below S = min_capacity E / (k cf) the capacity floor, not cf, sets C and the experts
    # compute mostly empty slots: at E = 8, H = 64, top-1 the cost bound alone gives S = 6 and
    # 5.3 slots per token instead of cf = 1.25. (Rounded down: C is then min_capacity.)
    floor = 1 if self.dispatch_path == "dropless" else int(
        self.min_capacity * self.num_experts / (self.num_selected * self.capacity_factor))
    return dispatch_lib.auto_group_size(num_tokens, dispatch_lib.expert_matrices(self.activation),
                                        self.expert_hidden_dim, min_size=floor)

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """C for a group of `group_size` tokens, never more than the group itself.

    Soft MoE: fixed by the configured group_size and capacity_factor (the shape of its slot
    parameters). BASE in training: S / E, what its balanced assignment gives every expert.
    """
    if self.router == "soft":
      return min(self.group_size, expert_capacity(self.group_size, self.num_experts, 1,
                                                  self.capacity_factor, self.min_capacity))
    if self.router == "base" and not deterministic:
      return group_size // self.num_experts
    factor = self.eval_capacity_factor if deterministic else self.capacity_factor
    return min(group_size, expert_capacity(group_size, self.num_experts, self.num_selected,
                                           factor, self.min_capacity))

  def _make_router(self):
    router_cls, _ = ROUTERS[self.router]
    kwargs = dict(num_experts=self.num_experts, init_scale=self.router_init_scale,
                  jitter_eps=self.jitter_eps, noise_std=self.noise_std, name="router")
    if self.router in TOKENS_CHOOSE_ROUTERS:
      kwargs.update(k=self.num_selected, batch_prioritized=self.batch_prioritized)
    if self.router == "gshard":
      kwargs.update(second_expert_policy=self.second_expert_policy)
    if self.router == "hash":
      kwargs.update(num_ids=self.num_token_ids)
    if self.router == "loss_free":
      kwargs.update(scores=self.router_scores, bias_update_rate=self.bias_update_rate)
    return router_cls(**kwargs)

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None, *,
               token_ids: Optional[Array] = None, deterministic: bool = False) -> Array:
    """x [..., M], token_mask [...] (1 = real token; padding is never routed) -> [..., M].

    token_ids: [...] int in [0, num_token_ids), what router='hash' routes by (LM: input token
    ids, ViT: token positions); ignored by the other routers.
    """
    group_size = self.resolved_group_size(math.prod(x.shape[:-1]))
    groups, group_mask = dispatch_lib.group_tokens(x, token_mask, group_size)
    group_ids = None
    if self.router == "hash":
      if token_ids is None or self.num_token_ids is None:
        raise ValueError("MoeLayer.router='hash' routes by token id: call it with token_ids "
                         "and set num_token_ids (the id range)")
      group_ids = dispatch_lib.group_tokens(token_ids[..., None], None, group_size)[0][..., 0]
    dropless = self.dispatch_path == "dropless"
    capacity = None if dropless else self.capacity(groups.shape[1], deterministic)
    routing = self._make_router()(groups, capacity=capacity, token_mask=group_mask,
                                  token_ids=group_ids, deterministic=deterministic)
    experts = FeedForward(self.expert_hidden_dim, self.activation, num_experts=self.num_experts,
                          dtype=self.dtype, expert_parallel=self.expert_parallel,
                          dropless_form=self.dropless_form or dispatch_lib.default_dropless_form(),
                          name="experts")
    if dropless:
      choice_expert = routing.choice_expert.reshape(-1, self.num_selected)  # [T,K]
      form = experts.dropless_form
      spare = chunk_sizes(choice_expert.size)[0] if form == "chunks" else 0
      block_size = (dispatch_lib.dropless_block_size(choice_expert.size, self.num_experts)
                    if form == "blocks" else None)
      layout = dispatch_lib.dropless_layout(choice_expert, self.num_experts, spare, block_size)
      rows = dispatch_lib.dropless_dispatch(
          groups.reshape(-1, groups.shape[-1]).astype(self.dtype), layout)
      y = dispatch_lib.dropless_combine(experts(rows, layout), layout,
                                        routing.choice_gate.reshape(choice_expert.shape))
      y = y.reshape(groups.shape)
    else:
      buffers = dispatch_lib.dispatch(groups.astype(self.dtype), routing, self.dispatch_path)
      y = dispatch_lib.combine(experts(buffers), routing, self.dispatch_path)
    y = dispatch_lib.ungroup_tokens(y, x.shape)

    self.sow("losses", "load_balance_loss", routing.aux_loss)
    self.sow("losses", "z_loss", routing.z_loss)
    self.sow("routing_stats", "stats", routing_statistics(routing, group_mask))
    if self.is_mutable_collection("intermediates"):  # asked for by analysis, never in training
      selected, processed = routing.token_experts()
      self.sow("intermediates", "decisions",
               {"probs": routing.probs, "selected": selected, "processed": processed})
    if self.residual:
      mlp = FeedForward(self.expert_hidden_dim, self.activation, dtype=self.dtype,
                        name="residual_mlp")(x)
      coef = jax.nn.softmax(nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32,
                                     name="residual_coef")(x.astype(jnp.float32)), axis=-1)
      y = y * coef[..., :1] + mlp * coef[..., 1:]
    if self.num_shared_experts:
      y = y + FeedForward(self.num_shared_experts * self.expert_hidden_dim, self.activation,
                          dtype=self.dtype, name="shared_experts")(x)
    return y.astype(x.dtype)
