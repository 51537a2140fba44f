"""Device mesh, logical axis rules and expert parallelism (letters: see routing.py).

Mesh axes (all `AxisType.Auto`: XLA's GSPMD propagates shardings from the jit in/out shardings and
the constraints below; nothing is typed into the arrays, so the same code runs on one device):
  data    data parallelism: the batch is split over it.
  expert  expert parallelism: experts are split over it, and so is the batch, so that every
          device holds E / |expert| experts and a 1 / (|data| |expert|) slice of the tokens.
  model   tensor parallelism of the FFN/expert hidden dim H (it must divide H).

Parameters carry logical axis names (`nn.with_logical_partitioning`): experts
('expert', 'embed', 'mlp') and ('expert', 'mlp', 'embed'), dense FFNs ('embed', 'mlp'); everything
else is replicated. `config.mesh.rules` maps logical names to mesh axes (DEFAULT_RULES).

Expert parallelism moves tokens to the experts' devices with an all-to-all, two ways:
  gspmd      sharding constraints on the dispatched [G,E,C,M] buffers (G over data, E over
             expert) make XLA insert the all-to-all.
  shard_map  the experts run inside `jax.shard_map`, with explicit `jax.lax.all_to_all` over the
             expert axis before and after them.
Both are fixed-capacity all-to-alls (ragged_all_to_all does not run on XLA:CPU).
The dropless path runs expert-parallel with shard_map only (run_dropless_experts): the counts
per device are known only at run time, which GSPMD's constraints cannot express.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moe_jax import dispatch

Array = jax.Array

__all__ = ["BATCH_AXES", "DEFAULT_RULES", "EXPERT_PARALLEL", "MESH_AXES", "batch_sharding",
           "check_divisibility", "constrain", "like_params", "logical_shardings", "make_mesh",
           "mesh_shape", "run_dropless_experts", "run_experts"]

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")  # the batch (and the groups of tokens) is split over both
EXPERT_PARALLEL = ("none", "gspmd", "shard_map")
DEFAULT_RULES = (("expert", "expert"), ("mlp", "model"), ("embed", None))


def mesh_shape(sizes: dict, num_devices: int) -> tuple:
  """Sizes {'data': -1, 'expert': 4, 'model': 1} -> (data, expert, model); -1 = the rest."""
  for axis in MESH_AXES:
    if sizes[axis] == 0 or sizes[axis] < -1:
      raise ValueError(f"config.mesh.{axis}={sizes[axis]} must be >= 1, or -1 (the devices left "
                       "over)")
  rest = [a for a in MESH_AXES if sizes[a] == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh.{rest[0]} and config.mesh.{rest[1]} are both -1 (the devices "
                     "left over): give one of them a size")
  fixed = math.prod(sizes[a] for a in MESH_AXES if sizes[a] != -1)
  if num_devices % fixed or (not rest and fixed != num_devices):
    shape = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    raise ValueError(f"config.mesh sizes {shape} do not fit the {num_devices} devices: their "
                     f"product must be {num_devices}, or divide it with one size -1")
  return tuple(num_devices // fixed if sizes[a] == -1 else sizes[a] for a in MESH_AXES)


def make_mesh(sizes: dict, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, expert, model) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over (data, expert); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (others replicate)."""
  import flax.linen as nn  # local: keeps this module importable without building models
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(rule) for rule in rules))


def constrain(x: Array, spec: P) -> Array:
  """with_sharding_constraint against the mesh set by `jax.set_mesh` (a no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _kernel_specs(num_kernels: int) -> tuple:
  """The experts' kernels in shard_map: the input kernels [E,M,H] split H over model, the output
  kernel [E,H,M] too."""
  return (P("expert", None, "model"),) * (num_kernels - 1) + (P("expert", "model", None),)


def run_experts(expert_fn: Callable, buffers: Array, kernels: Sequence[Array],
                mode: str) -> Array:
  """Runs the experts on dispatched buffers [G,E,C,M] -> [G,E,C,M], expert-parallel by `mode`.

  expert_fn(buffers [G',E',C,M], *kernels [E',...]) runs E' experts on their slots.
  Kernels are [E, M, H] / [E, H, M], sharded ('expert', ., 'model') by the logical rules.
  """
  if mode == "none" or jax.sharding.get_abstract_mesh().empty:
    return expert_fn(buffers, *kernels)
  if mode == "gspmd":
    # G over data and E over expert: moving from the token layout (G over data and expert) to
    # this one is the all-to-all; the second constraint moves back for the combine.
    out = expert_fn(constrain(buffers, P("data", "expert")), *kernels)
    return constrain(constrain(out, P("data", "expert")), P(BATCH_AXES))

  def local_experts(local_buffers, *local_kernels):
    # [G/(D X), E, C, M] -> [G/D, E/X, C, M]: send expert chunk j to device j of the expert axis.
    received = jax.lax.all_to_all(local_buffers, "expert", split_axis=1, concat_axis=0,
                                  tiled=True)
    out = expert_fn(received, *local_kernels)
    out = jax.lax.psum(out, "model")  # each model shard summed its slice of H
    return jax.lax.all_to_all(out, "expert", split_axis=0, concat_axis=1, tiled=True)

  return jax.shard_map(local_experts, in_specs=(P(BATCH_AXES),) + _kernel_specs(len(kernels)),
                       out_specs=P(BATCH_AXES), check_vma=False)(buffers, *kernels)


def run_dropless_experts(expert_fn: Callable, x: Array, choice_expert: Array, gates: Array,
                         kernels: Sequence[Array], form: str) -> Array:
  """The dropless path expert-parallel: tokens x [G,S,M], choice_expert [G,S,K] (E = not
  processed), gates [G,S,K] -> [G,S,M], the groups split over the batch axes.

  expert_fn(rows [R',M], layout, *kernels [E',...]) runs E' = E / X local experts on rows sorted
  by expert in dropless form `form` (X = the expert axis's size). Each device sorts its N = S' K
  pairs by expert, sends each device the rows of its experts, sorts what it receives by local
  expert, runs its experts and sends the outputs back. The all-to-alls carry N rows per
  destination, the worst case: ragged_all_to_all, which would send only the rows, does not run on
  XLA:CPU (jax 0.10).
  """
  devices = dict(jax.sharding.get_abstract_mesh().shape)["expert"]
  num_experts = kernels[0].shape[0]
  local_experts = num_experts // devices

  def exchange(rows, counts, *local_kernels):
    """rows [N,M] sorted by expert, counts [E] -> the experts' outputs [N,M]."""
    num_pairs = rows.shape[0]
    counts = counts.reshape(devices, local_experts)  # [X, E'] pairs for each device's experts
    sent = counts.sum(axis=-1)
    # Slot (d, p) of the send buffer [X*N] holds sorted row starts[d] + p, for p < sent[d].
    starts = jnp.cumsum(sent) - sent
    position = jnp.arange(num_pairs, dtype=jnp.int32)
    slot_row = jnp.where(position < sent[:, None], starts[:, None] + position,
                         num_pairs).reshape(-1)
    row_slot = dispatch.inverse_index(slot_row, num_pairs)  # [N, 1]
    send = dispatch.take_rows(rows, slot_row, row_slot)  # [X*N, M]
    to_devices = lambda a: jax.lax.all_to_all(a.reshape(devices, num_pairs, -1), "expert", 0, 0,
                                              tiled=True).reshape(devices * num_pairs, -1)
    received = to_devices(send)  # N slots from each device
    received_counts = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # [X, E']
    # A received row's local expert: how many of its sender's runs end at or before it.
    local_expert = jax.vmap(jnp.searchsorted, (0, None, None))(
        jnp.cumsum(received_counts, axis=-1), position, "right")  # [X, N]; E' = padding
    layout = dispatch.dropless_plan(local_expert.reshape(-1, 1), local_experts, form)
    out = expert_fn(dispatch.dropless_dispatch(received, layout), layout, *local_kernels)
    out = jax.lax.psum(out, "model")  # each model shard summed its slice of H
    back = dispatch.take_rows(out, layout.pair_row.reshape(-1), layout.row_pair[:, None])
    return dispatch.take_rows(to_devices(back), row_slot[:, 0], slot_row[:, None])

  def local_moe(x, choice_expert, gates, *local_kernels):
    tokens = x.reshape(-1, x.shape[-1])
    layout = dispatch.dropless_layout(choice_expert.reshape(-1, choice_expert.shape[-1]),
                                      num_experts)
    out = exchange(dispatch.dropless_dispatch(tokens, layout), layout.group_sizes,
                   *local_kernels)
    return dispatch.dropless_combine(out, layout, gates.reshape(-1, gates.shape[-1])).reshape(
        x.shape)

  batch = P(BATCH_AXES)
  return jax.shard_map(local_moe, in_specs=(batch, batch, batch) + _kernel_specs(len(kernels)),
                       out_specs=batch, check_vma=False)(x, choice_expert, gates, *kernels)


def check_divisibility(config, tokens_per_example: int, num_devices: int,
                       moe_groups: Sequence[Tuple[int, int]]) -> None:
  """One-line errors for mesh sizes that do not fit the batch, the groups or the experts.

  moe_groups: (group size S as resolved for a batch, num_experts E) of every MoE layer.
  """
  data, expert, model = mesh_shape(config.mesh, num_devices)
  shards = data * expert
  t = config.train
  batch_size = t.batch_size // t.microbatches  # each micro-batch spreads over every shard
  if batch_size % shards:
    per_micro = "" if t.microbatches == 1 else f" / microbatches={t.microbatches}"
    raise ValueError(f"config.train.batch_size={t.batch_size}{per_micro} must be divisible by "
                     f"the {shards} batch shards (mesh data={data} x expert={expert})")
  if not moe_groups:
    return
  batch_tokens = batch_size * tokens_per_example
  configured = config.model.moe.group_size
  for group_size, num_experts in moe_groups:
    groups = -(-batch_tokens // min(group_size, batch_tokens))
    if groups % shards:
      auto = "" if configured else f" (auto: S={group_size})"
      raise ValueError(f"config.model.moe.group_size={configured}{auto} gives {groups} "
                       f"groups per batch, not divisible by the {shards} batch shards "
                       f"(mesh data={data} x expert={expert})")
    if num_experts % expert:
      raise ValueError(f"config.model.moe.num_experts={num_experts} is not divisible by "
                       f"config.mesh.expert={expert}")
  if model > 1 and config.model.moe.expert_hidden_dim % model:
    raise ValueError(f"config.model.moe.expert_hidden_dim={config.model.moe.expert_hidden_dim}"
                     f" is not divisible by config.mesh.model={model}")


def like_params(tree, param_shardings, default: NamedSharding):
  """Shardings for a tree of param-shaped leaves (e.g. an optimizer state): each leaf whose path
  ends with a parameter's path and has its shape takes that parameter's sharding; others
  (counts, schedules) get `default`."""
  by_path = {}
  for path, value in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[tuple(str(getattr(k, "key", k)) for k in path)] = value

  def match(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    for start in range(len(keys)):
      sharding = by_path.get(keys[start:])
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return default

  return jax.tree_util.tree_map_with_path(match, tree)
