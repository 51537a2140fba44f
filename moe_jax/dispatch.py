"""Dispatch and combine: moving tokens into expert buffers and back (letters: see routing.py).

Four paths:
  einsum: the GShard/Switch form. Dense [G,S,E,C] masks contract with the tokens; dispatch plus
    combine cost about 2S/(nH) of the expert matmuls (n expert matrices), so groups must be small.
  index (the default): gathers each slot's token into a [G,E,C,M] buffer and gathers each
    token's weighted slot outputs back. No dense mask; the cost does not grow with the group size.
    Same result as einsum.
  dropless: no capacity (MegaBlocks). The (token, choice) pairs of all groups are sorted by
    expert into rows [R,M]; the experts run on contiguous runs of rows (`jax.lax.ragged_dot`, a
    loop over experts and static-size chunks of their rows, blocks of rows, or
    `tokamax.ragged_dot`'s grouped-matmul kernels, see DROPLESS_FORMS) and the rows are gathered
    back.
    Same result as einsum when einsum drops nothing. Tokens-choose routers only.
  merge: no dispatch at all (SMEAR): each group's tokens run through one FFN, the experts'
    parameters averaged by the group's merge weights (experts.FeedForward).
Empty slots hold zeros and carry zero combine weight, so a token no expert kept gets exactly 0.
Each path takes the routing forms of PATH_FORMS (routing.py) and refuses the others.
Forward-mode autodiff (jax.jvp, Hessian-vector products) works on every path and form: the dropless
'chunks' and 'tokamax' forms, whose backward is a custom_vjp that JAX cannot differentiate forward,
run their experts as 'ragged_dot' under forward mode (experts.in_forward_mode).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import jax
import jax.numpy as jnp

from flax import struct

from moe_jax.routing import RoutingOutput
from moe_jax.validation import allowed

Array = jax.Array

__all__ = ["BLOCK_COST_ROWS", "CAPACITY_PATHS", "CHUNK_ROWS", "DISPATCH_PATHS", "DROPLESS_FORMS",
           "DroplessLayout", "MIN_CHUNK_ROWS", "PATH_FORMS", "TOKAMAX_MIN_COMPUTE_CAPABILITY",
           "auto_group_size", "block_rows", "check_form", "chunk_sizes", "default_dropless_form",
           "dropless_block_size", "dropless_combine", "dropless_dispatch", "dropless_layout",
           "dropless_plan", "einsum_combine", "einsum_dispatch", "expert_matrices", "from_experts",
           "group_tokens", "index_combine", "index_dispatch", "inverse_index", "run_starts",
           "take_rows", "to_experts", "tokamax_gpu", "ungroup_tokens"]

DISPATCH_PATHS = ("einsum", "index", "dropless", "merge")
# The routing forms (routing.FORMS) each path takes; einsum and index need the slots of a
# capacity (CAPACITY_PATHS), dropless the token-major choices, merge the merge weights.
PATH_FORMS = {"einsum": ("choices", "slots", "soft"), "index": ("choices", "slots"),
              "dropless": ("choices",), "merge": ("merge",)}
CAPACITY_PATHS = ("einsum", "index")
# How the dropless path runs the experts on the sorted rows (BENCHMARKS.md compares them on CPU;
# what is said of the GPU was measured on one H200 at commit 76775f3, in that page's history):
#   ragged_dot: one grouped matmul per weight. XLA:CPU, and XLA:GPU in jax 0.11, lower it densely:
#     about E times the work and E times the memory (out of memory at 65536 tokens on an H200).
#   chunks: a scan over experts, each running its rows in static-size chunks (experts._chunked_mlp);
#     the fastest on CPU, slow on a GPU (its loops launch many small kernels).
#   blocks: every expert's run starts at a multiple of a block size B (MegaBlocks' padding); the
#     blocks run as one batched matmul, each with a gathered copy of its expert's weights.
#   tokamax: `tokamax.ragged_dot`, grouped-matmul kernels forward and backward (Mosaic GPU from
#     Hopper, Triton from Ampere; on CPU its "xla" implementation, lowered as ragged_dot is).
DROPLESS_FORMS = ("ragged_dot", "chunks", "blocks", "tokamax")
# GPUs that tokamax.ragged_dot runs a grouped-matmul kernel on (compute capability): Triton from
# 8.0, Mosaic GPU from 9.0; below, it falls back to XLA's dense lowering.
TOKAMAX_MIN_COMPUTE_CAPABILITY = 8.0
# What a block's copy of its expert's weights costs, in rows of matmul work (GPU, bf16).
BLOCK_COST_ROWS = 256

# Chunk sizes of the CPU dropless form: each expert's run of rows is covered by chunks of
# CHUNK_ROWS, then chunks of smaller powers of two down to MIN_CHUNK_ROWS (experts._over_chunks).
# Larger chunks amortize the matmuls' weight packing: at T = 8192, M = 512, H = 2048, E = 8,
# top-2 the experts' forward+backward ran at 72%, 74%, 76%, 75% of the matmul peak with 256, 512,
# 1024 and 2048-row chunks (one interleaved run, 2 XLA:CPU cores); at E = 64 all four ran at 61%.
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




def tokamax_gpu() -> bool:
  """Whether tokamax is installed and the default device is a GPU it has a grouped-matmul kernel for
  (TOKAMAX_MIN_COMPUTE_CAPABILITY)."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return False
  if importlib.util.find_spec("tokamax") is None:  # optional: only the 'tokamax' form needs it
    return False
  capability = getattr(device, "compute_capability", None)
  return capability is not None and float(capability) >= TOKAMAX_MIN_COMPUTE_CAPABILITY


def default_dropless_form() -> str:
  """Per backend: 'tokamax' on a GPU it supports (tokamax_gpu), else 'blocks' on GPU (the fastest
  XLA form on an H200 at commit 76775f3); 'chunks' on CPU; 'ragged_dot' on TPU (not measured: no TPU
  was at hand)."""
  if tokamax_gpu():
    return "tokamax"
  return {"gpu": "blocks", "tpu": "ragged_dot"}.get(jax.default_backend(), "chunks")


def dropless_block_size(num_pairs: int, num_experts: int) -> int:
  """B for the blocks form: N pairs in at most N/B + E blocks of B rows cost about
  N + E B + BLOCK_COST_ROWS (N/B + E) rows of work, least at B = sqrt(BLOCK_COST_ROWS N / E);
  the power of two at or below it, within [8, 1024]."""
  best = math.sqrt(BLOCK_COST_ROWS * num_pairs / num_experts)
  return min(1024, max(8, 2 ** int(math.log2(max(best, 1)))))


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


def expert_matrices(activation: str) -> int:
  """n, the weight matrices of one expert (or FFN): 3 for swiglu (gate, up, out), else 2."""
  return 3 if activation == "swiglu" else 2


def auto_group_size(num_tokens: int, num_matrices: int, hidden_dim: int,
                    overhead: float = 0.1, min_size: int = 1) -> int:
  """Default S: the einsum path's dispatch + combine cost 2S/(nH) of the expert matmuls stays
  under `overhead`, i.e. S <= overhead * n * H / 2 (docs/ROUTING.md, cost model), but S >= min_size.

  Returns the largest divisor of num_tokens within [max(bound / 2, min_size), bound] (no
  padding), else the bound itself (the last group padded); num_tokens when it is within the
  bound. bound = max(overhead * n * H / 2, min_size).
  """
  bound = max(1, min_size, int(overhead * num_matrices * hidden_dim / 2))
  if num_tokens <= bound:
    return num_tokens
  for size in range(bound, max((bound + 1) // 2, min_size) - 1, -1):
    if num_tokens % size == 0:
      return size
  return bound


def ungroup_tokens(y: Array, shape: tuple) -> Array:
  """Inverse of group_tokens: y [G,S,M] -> [*shape] with the padding removed."""
  num_tokens = math.prod(shape[:-1])
  return y.reshape(-1, y.shape[-1])[:num_tokens].reshape(shape)


def einsum_dispatch(x: Array, routing: RoutingOutput) -> Array:
  """x [G,S,M] -> expert buffers [G,E,C,M] through the dense dispatch mask."""
  return jnp.einsum("gsm,gsec->gecm", x, routing.dispatch_mask().astype(x.dtype))


def einsum_combine(expert_out: Array, routing: RoutingOutput) -> Array:
  """Expert outputs [G,E,C,M] -> [G,S,M] weighted by the dense combine tensor."""
  return jnp.einsum("gecm,gsec->gsm", expert_out, routing.combine_tensor().astype(expert_out.dtype))


@jax.custom_jvp
def take_rows(x: Array, index: Array, inverse: Array) -> Array:
  """out[i] = x[index[i]], zeros where index[i] is out of range; a gather in both directions.

  Args:
    x: [A,M] rows.
    index: [B] int32, the row of x that each output row reads (>= A: none).
    inverse: [A,R] int32, the output rows that read each row of x (>= B pads rows read fewer
      than R times); it must list exactly the rows that `index` sends there.
  Returns:
    [B,M]. The backward, dx[a] = sum_r dout[inverse[a, r]], is a gather too: the scatter-add
    that autodiff of the gather would emit is slow on XLA:CPU.
  """
  return x.at[index].get(mode="fill", fill_value=0)


@take_rows.defjvp
def _take_rows_jvp(primals, tangents):
  # A custom_jvp (not custom_vjp) so that forward mode (jax.jvp, Hessian-vector products) works.
  # The tangent is written as the scatter-add through `inverse`, whose transpose, what reverse
  # mode runs, is the gather dx[a] = sum_r dout[inverse[a, r]]; forward mode alone scatters.
  x, index, inverse = primals
  dx = tangents[0]
  updates = jnp.broadcast_to(dx[:, None], (*inverse.shape, dx.shape[-1]))  # [A,R,M]
  zeros = jnp.zeros((index.shape[0], dx.shape[-1]), dx.dtype)
  return take_rows(x, index, inverse), zeros.at[inverse].add(updates, mode="drop")


def inverse_index(index: Array, size: int) -> Array:
  """[B] row index into `size` rows, each read at most once -> [size, 1] inverse (B = none)."""
  positions = jnp.arange(index.shape[0], dtype=jnp.int32)
  return jnp.full((size,), index.shape[0], jnp.int32).at[index].set(positions, mode="drop")[:, None]


def index_dispatch(x: Array, routing: RoutingOutput) -> Array:
  """x [G,S,M] -> [G,E,C,M]: gathers the token of every slot (empty slots read zeros)."""
  num_groups, num_experts, capacity = routing.slot_token.shape
  slots = routing.slot_token.reshape(num_groups, -1)  # [G, E*C]
  if routing.form == "slots":  # expert choice: a token fills any number of slots
    gather = lambda xg, slots: xg.at[slots].get(mode="fill", fill_value=0)
    buffers = jax.vmap(gather)(x, slots)
  else:
    buffers = jax.vmap(take_rows)(x, slots, routing.choice_slot)
  return buffers.reshape(num_groups, num_experts, capacity, -1)


def index_combine(expert_out: Array, routing: RoutingOutput) -> Array:
  """[G,E,C,M] -> [G,S,M]: sums each token's weighted slot outputs.

  Tokens-choose: gathers each token's K slots (each slot holds at most one (token, choice), so
  the backward is a gather too). Expert choice: scatter-adds each slot to its token.
  """
  num_groups, group_size = routing.probs.shape[:2]
  flat_out = expert_out.reshape(num_groups, -1, expert_out.shape[-1])  # [G, E*C, M]
  if routing.form == "slots":
    weighted = flat_out * routing.slot_gate.reshape(num_groups, -1, 1).astype(flat_out.dtype)

    def scatter(out_g, slots):
      zeros = jnp.zeros((group_size, out_g.shape[-1]), out_g.dtype)
      return zeros.at[slots].add(out_g, mode="drop")  # empty slots point past the end

    return jax.vmap(scatter)(weighted, routing.slot_token.reshape(num_groups, -1))
  choices = routing.choice_slot.reshape(num_groups, -1)  # [G, S*K]
  slot_choice = jax.vmap(inverse_index, (0, None))(choices, flat_out.shape[1])  # [G, E*C, 1]
  picked = jax.vmap(take_rows)(flat_out, choices, slot_choice)  # [G, S*K, M]
  picked = picked.reshape(*routing.choice_slot.shape, -1)  # [G,S,K,M]
  return jnp.einsum("gskm,gsk->gsm", picked, routing.choice_gate.astype(picked.dtype))


@struct.dataclass
class DroplessLayout:
  """Where the (token, choice) pairs sit once sorted by expert (N = T K pairs, R >= N rows).

  Attributes:
    row_token: [R] int32 token read by each row; T for a row past the processed pairs.
    row_pair: [R] int32 pair (t K + k) in each row; N for a row past the processed pairs.
    pair_row: [T,K] int32 row of each pair; R for a pair that is not processed (expert E).
    group_sizes: [E] int32 pairs per expert: expert e's pairs are rows
      [sum(group_sizes[:e]), sum(group_sizes[:e+1])); with blocks, from the start of its first
      block.
    block_expert: [R/B] int32 expert of each block of B rows (the blocks form; else None).
      Blocks past the last expert's run hold no pairs and name expert E - 1.
  """
  row_token: Array
  row_pair: Array
  pair_row: Array
  group_sizes: Array
  block_expert: Optional[Array] = None


def block_rows(num_pairs: int, num_experts: int, block_size: int) -> int:
  """R of the blocks layout: B (ceil(N/B) + E) rows hold N pairs in runs that each start at a
  multiple of B, whatever the counts per expert."""
  return block_size * (-(-num_pairs // block_size) + num_experts)


def run_starts(group_sizes: Array) -> Array:
  """[E] first sorted position of each expert's run of pairs (an exclusive cumulative sum)."""
  return jnp.cumsum(group_sizes) - group_sizes


def dropless_layout(choice_expert: Array, num_experts: int, spare_rows: int = 0,
                    block_size: Optional[int] = None) -> DroplessLayout:
  """Sorts the pairs by expert (stable): choice_expert [T,K] (E = not processed) -> layout.

  Without block_size: R = N + spare_rows rows (the chunks form needs room past the last expert's
  run). With block_size B: every expert's run starts at a multiple of B, in R = B (ceil(N/B) + E)
  rows, enough for any counts (spare_rows is not used).
  """
  k = choice_expert.shape[-1]
  experts = choice_expert.reshape(-1).astype(jnp.int32)  # [N]
  num_pairs = experts.shape[0]
  order = jnp.argsort(experts, stable=True).astype(jnp.int32)  # sorted position -> pair
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[experts].add(1, mode="drop")
  sorted_experts = experts[order]
  processed = sorted_experts < num_experts
  position = jnp.arange(num_pairs, dtype=jnp.int32)
  block_expert = None
  if block_size is None:  # rows are the sorted positions: no scatter needed
    num_rows = num_pairs + spare_rows
    row = jnp.where(processed, position, num_rows)
    spare = jnp.full((spare_rows,), num_pairs, jnp.int32)
    row_pair = jnp.concatenate([jnp.where(processed, order, num_pairs), spare])
  else:
    num_rows = block_rows(num_pairs, num_experts, block_size)
    num_blocks = num_rows // block_size
    blocks = -(-group_sizes // block_size)  # [E] blocks of each expert's run
    block_end = jnp.cumsum(blocks)
    block_start = block_size * (block_end - blocks)
    expert = jnp.minimum(sorted_experts, num_experts - 1)
    row = jnp.where(processed, block_start[expert] + position - run_starts(group_sizes)[expert],
                    num_rows)
    row_pair = jnp.full((num_rows,), num_pairs, jnp.int32).at[row].set(order, mode="drop")
    block_expert = jnp.minimum(
        jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"),
        num_experts - 1).astype(jnp.int32)
  row_token = jnp.where(row_pair < num_pairs, row_pair // k, num_pairs // k)
  pair_row = jnp.zeros((num_pairs,), jnp.int32).at[order].set(row).reshape(-1, k)
  return DroplessLayout(row_token=row_token, row_pair=row_pair, pair_row=pair_row,
                        group_sizes=group_sizes, block_expert=block_expert)


def dropless_dispatch(x: Array, layout: DroplessLayout) -> Array:
  """Tokens x [T,M] -> sorted rows [R,M] (padding rows are zeros)."""
  return take_rows(x, layout.row_token, layout.pair_row)


def dropless_combine(rows: Array, layout: DroplessLayout, gates: Array) -> Array:
  """Expert outputs rows [R,M] -> [T,M], each token's K rows weighted by gates [T,K]."""
  picked = take_rows(rows, layout.pair_row.reshape(-1), layout.row_pair[:, None])  # [T*K, M]
  picked = picked.reshape(*gates.shape, -1)  # [T,K,M]
  return jnp.einsum("tkm,tk->tm", picked, gates.astype(picked.dtype))


def check_form(path: str, routing: RoutingOutput) -> None:
  """A one-line error unless `path` takes the routing's form (PATH_FORMS)."""
  needs_slots = path in CAPACITY_PATHS
  wrong_form = routing.form not in PATH_FORMS[path]
  capacity_needed = needs_slots and not wrong_form and not routing.has_slots
  if wrong_form or capacity_needed:
    raise ValueError(f"dispatch path {path!r} takes the routing forms "
                     f"{allowed(PATH_FORMS[path])}{' with capacity' if needs_slots else ''}"
                     f", not {type(routing).__name__} (form {routing.form!r}"
                     f"{', no capacity' if capacity_needed else ''})")


def dropless_plan(choice_expert: Array, num_experts: int, form: str) -> DroplessLayout:
  """The layout of the (token, choice) pairs choice_expert [T,K] for dropless form `form`: the
  chunks form needs room for a last chunk past the pairs, the blocks form a block size."""
  spare = chunk_sizes(choice_expert.size)[0] if form == "chunks" else 0
  block_size = dropless_block_size(choice_expert.size, num_experts) if form == "blocks" else None
  return dropless_layout(choice_expert, num_experts, spare, block_size)


def to_experts(x: Array, routing: RoutingOutput, path: str) -> Array:
  """x [G,S,M] -> expert buffers [G,E,C,M] by capacity path 'einsum' or 'index'."""
  check_form(path, routing)
  if path == "einsum":
    return einsum_dispatch(x, routing)
  return index_dispatch(x, routing)


def from_experts(expert_out: Array, routing: RoutingOutput, path: str) -> Array:
  """Expert outputs [G,E,C,M] -> [G,S,M] by capacity path 'einsum' or 'index'."""
  if path == "einsum":
    return einsum_combine(expert_out, routing)
  return index_combine(expert_out, routing)
