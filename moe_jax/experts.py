"""The expert computations: the FFN weights and every way of running experts on tokens.

  FeedForward      the module that owns the weights: one FFN (dense) or E stacked experts,
                   also run merged (SMEAR: one FFN per group, the experts' weights averaged).
  experts_mlp      E experts on capacity buffers [G,E,C,M] (einsum and index paths), run
                   expert-parallel by sharding.run_experts.
  dropless_experts_mlp  the experts on rows sorted by expert [R,M] (dropless path), in one of
                   dispatch.DROPLESS_FORMS: ragged_dot, chunks (a hand-written VJP), blocks or
                   tokamax (tokamax.ragged_dot's grouped-matmul kernels).
  ZeroComputationExperts  MoE++'s zero, copy and constant experts, on every token by its gates.

Letters: see routing.py.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import sharding
from moe_jax.dispatch import (DROPLESS_FORMS, DroplessLayout, chunk_sizes, dropless_combine,
                              dropless_dispatch, dropless_plan, run_starts)
from moe_jax.validation import allowed

Array = jax.Array

__all__ = ["ACTIVATIONS", "FeedForward", "ZeroComputationExperts", "activate",
           "dropless_experts_mlp", "experts_mlp", "mlp"]

ACTIVATIONS = ("gelu", "relu", "swiglu")


def activate(activation: str, *pre: Array) -> Array:
  """Hidden units from the input projections: (h,) for gelu/relu, (gate, up) for swiglu."""
  if activation == "swiglu":
    return nn.silu(pre[0]) * pre[1]
  return (nn.gelu if activation == "gelu" else nn.relu)(pre[0])


def mlp(x: Array, kernels, activation: str, spec_in: str, spec_out: str, dtype) -> Array:
  """The MLP on x with kernels (w_in,) or (w_gate, w_up) for swiglu, then w_out."""
  x = x.astype(dtype)
  hidden = activate(activation, *(jnp.einsum(spec_in, x, k.astype(dtype)) for k in kernels[:-1]))
  return jnp.einsum(spec_out, hidden, kernels[-1].astype(dtype))


def experts_mlp(buffers: Array, *kernels, activation: str, dtype) -> Array:
  """E' experts on their slots: buffers [G,E',C,M], kernels [E',M,H].., [E',H,M] -> [G,E',C,M].

  One [G*C, M] x [M, H] matmul per expert: with G as an outer batch dimension XLA:CPU's backward
  ran 2.3x slower (measured at G=32, C=80, M=512, H=2048).
  """
  num_groups, num_experts, capacity, model_dim = buffers.shape
  tokens = jnp.swapaxes(buffers, 0, 1).reshape(num_experts, -1, model_dim)  # [E', G*C, M]
  y = mlp(tokens, kernels, activation, "etm,emh->eth", "eth,ehm->etm", dtype)
  return jnp.swapaxes(y.reshape(num_experts, num_groups, capacity, model_dim), 0, 1)


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
      y = activate(activation, *pre) @ weights[-1]
      return (jax.lax.dynamic_update_slice_in_dim(out, y, at, 0),
              tuple(jax.lax.dynamic_update_slice_in_dim(b, p, at, 0)
                    for b, p in zip(pre_buffers, pre)))

    return _over_chunks(count, sizes, chunk, carry), None

  # The pre-activations are kept for the backward (recomputing them costs more, measured).
  init = (jnp.zeros_like(rows), tuple(jnp.zeros((rows.shape[0], w.shape[-1]), rows.dtype)
                                      for w in kernels[:-1]))
  (out, pre), _ = jax.lax.scan(expert, init,
                              (run_starts(group_sizes), group_sizes, *kernels))
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
      hidden, activate_vjp = jax.vjp(functools.partial(activate, activation), *pre)
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
                           (run_starts(group_sizes), group_sizes, *kernels))
  return (dx, None, *(g.astype(k.dtype) for g, k in zip(grads, kernels)))


_chunked_mlp.defvjp(_chunked_mlp_fwd, _chunked_mlp_bwd)


def in_forward_mode(*arrays) -> bool:
  """Whether forward-mode autodiff (jax.jvp, jacfwd, the outer jvp of a Hessian-vector product)
  is tracing any of `arrays`: a JVPTracer anywhere in the chain of tracers. Reverse mode
  (jax.grad, jax.vjp) traces with LinearizeTracers, so training keeps the chunks form. Reads
  JAX's tracer classes: where they are not found, False (JAX then refuses forward mode itself)."""
  from jax._src.interpreters import ad  # not public: the tracer types
  jvp_tracer = getattr(ad, "JVPTracer", None)
  if jvp_tracer is None:
    return False
  for value in arrays:
    while isinstance(value, jax.core.Tracer):
      if isinstance(value, jvp_tracer):
        return True
      value = getattr(value, "primal", getattr(value, "val", None))
  return False


def _tokamax_ragged_dot():
  """tokamax.ragged_dot(rows [R,K], kernels [E,K,N], group_sizes [E]) -> [R,N]: on CPU its "xla"
  implementation (what the tests run), elsewhere its own choice (Mosaic GPU, then Triton, ...)."""
  try:
    import tokamax  # here, not at the top: importing moe_jax must not need it
  except ImportError as error:
    others = allowed(f for f in DROPLESS_FORMS if f != "tokamax")
    raise ImportError("dropless_form='tokamax' needs the tokamax package (pinned in "
                      f"requirements.txt); allowed without it: {others}") from error
  from absl import flags
  if not flags.FLAGS.is_parsed():
    # tokamax reads its options from absl flags and would parse sys.argv for them: this
    # program's own arguments (pytest's -q, a script's --out) raise UnrecognizedFlagError there.
    flags.FLAGS.mark_as_parsed()
  implementation = "xla" if jax.default_backend() == "cpu" else None
  return functools.partial(tokamax.ragged_dot, implementation=implementation)


def dropless_experts_mlp(rows: Array, layout: DroplessLayout, *kernels,
                         activation: str, dtype, form: str) -> Array:
  """The experts on rows sorted by expert: rows [R,M], kernels [E,M,H].., [E,H,M] -> [R,M]."""
  rows = rows.astype(dtype)
  if form == "blocks":
    # Rows in blocks [R/B,B,M]; each block gathers its expert's weights [R/B,M,H] in float32, so
    # the backward sums the blocks' weight gradients in float32.
    kernels = [k[layout.block_expert].astype(dtype) for k in kernels]
    blocks = rows.reshape(kernels[0].shape[0], -1, rows.shape[-1])
    hidden = activate(activation, *(jnp.einsum("brm,bmh->brh", blocks, k) for k in kernels[:-1]))
    return jnp.einsum("brh,bhm->brm", hidden, kernels[-1]).reshape(rows.shape)
  kernels = [k.astype(dtype) for k in kernels]
  if form in ("chunks", "tokamax") and in_forward_mode(rows, *kernels):
    form = "ragged_dot"  # the same math, which JAX differentiates forward (their custom_vjps not)
  if form == "chunks":
    sizes = chunk_sizes(layout.pair_row.size)
    return _chunked_mlp(activation, sizes, rows, layout.group_sizes, *kernels)
  ragged_dot = _tokamax_ragged_dot() if form == "tokamax" else jax.lax.ragged_dot
  ragged = lambda x, k: ragged_dot(x, k, layout.group_sizes)
  hidden = activate(activation, *(ragged(rows, k) for k in kernels[:-1]))
  return ragged(hidden, kernels[-1])


class FeedForward(nn.Module):
  """Two-layer MLP, or E of them stacked when num_experts is set.

  Dense: x [..., M] -> [..., M] with wi [M,H], wo [H,M].
  Experts: x [G,E,C,M] -> [G,E,C,M] with wi [E,M,H], wo [E,H,M] (swiglu: wi_gate and wi_up),
  run expert-parallel by `expert_parallel` (see sharding.run_experts); or dropless, given
  `choices` = (choice_expert [G,S,K] (E = not processed), gates [G,S,K]): tokens x [G,S,M] ->
  [G,S,M], the (token, choice) pairs sorted by expert into rows, run in `dropless_form` and
  combined (expert-parallel with 'shard_map' only: sharding.run_dropless_experts); or merged,
  given `merge_weights` [G,E] (SMEAR): tokens x [G,S,M] -> [G,S,M], group g's tokens through one
  FFN with kernels sum_e merge_weights[g,e] W_e ([G,M,H].., [G,H,M]; the FFNs have no biases),
  not expert-parallel.
  Parameters are float32 with logical axes ('expert',) 'embed', 'mlp'; the matmuls run in `dtype`.
  """
  hidden_dim: int
  activation: str = "gelu"
  num_experts: Optional[int] = None
  dtype: Any = jnp.float32
  expert_parallel: str = "none"
  dropless_form: str = "chunks"

  @nn.compact
  def __call__(self, x: Array, choices: Optional[Tuple[Array, Array]] = None,
               merge_weights: Optional[Array] = None) -> Array:
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
      y = mlp(x.reshape(-1, model_dim), kernels, self.activation, "tm,mh->th", "th,hm->tm",
              self.dtype)
      return y.reshape(x.shape)
    if merge_weights is not None:
      mesh = jax.sharding.get_abstract_mesh()
      if (self.expert_parallel != "none" and not mesh.empty
          and dict(mesh.shape).get("expert", 1) > 1):
        raise ValueError(f"dispatch_path='merge' does not run expert-parallel: set "
                         f"expert_parallel='none', not {self.expert_parallel!r} (on a mesh with "
                         f"expert axis {dict(mesh.shape)['expert']})")
      # Merged in float32, the parameters' dtype; the G merged FFNs then run as experts_mlp's
      # expert axis on one buffer [1,G,S,M], one [S,M] x [M,H] matmul each.
      merged = [jnp.einsum("ge,e...->g...", merge_weights, k) for k in kernels]
      return experts_mlp(x[None], *merged, activation=self.activation, dtype=self.dtype)[0]
    if choices is not None:
      run = functools.partial(dropless_experts_mlp, activation=self.activation, dtype=self.dtype,
                              form=self.dropless_form)
      mesh = jax.sharding.get_abstract_mesh()
      if self.expert_parallel == "shard_map" and not mesh.empty:
        return sharding.run_dropless_experts(run, x, *choices, kernels, self.dropless_form)
      if (self.expert_parallel == "gspmd" and not mesh.empty
          and dict(mesh.shape).get("expert", 1) > 1):
        raise ValueError(f"dispatch_path='dropless' runs expert-parallel with "
                         f"expert_parallel='shard_map' only, not 'gspmd' (on a mesh with expert "
                         f"axis {dict(mesh.shape)['expert']})")
      choice_expert, gates = (c.reshape(-1, c.shape[-1]) for c in choices)
      layout = dropless_plan(choice_expert, self.num_experts, self.dropless_form)
      rows = dropless_dispatch(x.reshape(-1, model_dim), layout)
      return dropless_combine(run(rows, layout, *kernels), layout, gates).reshape(x.shape)
    expert_fn = functools.partial(experts_mlp, activation=self.activation, dtype=self.dtype)
    return sharding.run_experts(expert_fn, x, kernels, self.expert_parallel)


class ZeroComputationExperts(nn.Module):
  """MoE++'s zero-computation experts (Jin et al. 2024): x [G,S,M], gates [G,S,Z] -> [G,S,M], the
  sum over the Z experts of gate times output. Z = num_zero + num_copy + num_constant, in that
  order: a zero expert outputs 0, a copy expert x, constant expert j a1 x + a2 v_j with a learned
  v_j [M] and (a1, a2) = softmax(W_j x), W_j [M,2]. They cost O(M) per token, so they run densely
  on every token (a gate of 0 where the token did not choose the expert), never through the
  experts' capacity buffers.
  """
  num_zero: int
  num_copy: int
  num_constant: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, gates: Array) -> Array:
    gates = gates.astype(self.dtype)
    first_constant = self.num_zero + self.num_copy
    y = gates[..., self.num_zero:first_constant].sum(axis=-1, keepdims=True) * x  # copy experts
    if not self.num_constant:
      return y
    vectors = self.param("constants", nn.initializers.normal(1.0 / x.shape[-1] ** 0.5),
                         (self.num_constant, x.shape[-1]), jnp.float32)
    mix = nn.Dense(2 * self.num_constant, use_bias=False, dtype=self.dtype,
                   param_dtype=jnp.float32, name="mix")(x)
    mix = jax.nn.softmax(mix.reshape(*x.shape[:-1], self.num_constant, 2).astype(jnp.float32),
                         axis=-1).astype(self.dtype)  # [G,S,Z_c,2]
    constant_gates = gates[..., first_constant:, None] * mix  # [G,S,Z_c,2]
    return (y + constant_gates[..., 0].sum(axis=-1, keepdims=True) * x
            + jnp.einsum("gsj,jm->gsm", constant_gates[..., 1], vectors.astype(self.dtype)))
