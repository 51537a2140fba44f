"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model that starts from a dense checkpoint.

Set `config.train.upcycle_from` to the workdir of a finished (or checkpointed) dense run of the
same model. A new run then starts from that run's latest parameters: every expert of an MoE
layer is a copy of the dense MLP of its block, the router is freshly initialized, and every other
parameter (attention, norms, embeddings, head, the dense blocks' MLPs) is copied. The optimizer
state, step and learning-rate schedule start fresh. A run that resumes restores its own
checkpoint instead.

Because the experts are identical at step 0, a token's output is sum_e g_e * MLP(x) over its
kept choices: MLP(x) exactly for gates that sum to 1 (topk's renormalized top-k), p_e * MLP(x)
for switch's top-1 gate p_e (so the upcycled switch model is not the dense model at step 0).
With model.moe.granularity m > 1 the experts are slices of the dense MLP (granular upcycling,
`upcycle_params`).
"""
from __future__ import annotations

import json
import os

import flax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moe_jax.validation import ConfigError

# Model fields that set parameter shapes: the dense run must have the same values.
SHAPE_FIELDS = ("name", "num_layers", "width", "num_heads", "mlp_dim", "activation",
                "patch_size", "pooling", "norm", "positions")


def latest_step(workdir: str):
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path) as manager:
    return manager.latest_step()


def check_config(config, workdir: str) -> None:
  """One-line ConfigErrors, before anything compiles, for an upcycling run that cannot start.

  A run that resumes from its own checkpoint in `workdir` does not read the dense run.
  """
  source = config.train.upcycle_from
  if not source or latest_step(workdir) is not None:
    return
  moe = config.model.moe
  if moe.router == "dense":
    raise ConfigError(f"config.train.upcycle_from={source!r} needs MoE layers; "
                      "config.model.moe.router='dense'")
  if (moe.num_shared_experts, moe.residual) != (0, False):
    raise ConfigError("config.train.upcycle_from copies the dense MLP into routed experts; "
                      f"config.model.moe.num_shared_experts={moe.num_shared_experts}, "
                      f"residual={moe.residual} must be 0, False")
  path = os.path.join(source, "config.json")
  if not os.path.exists(path) or latest_step(source) is None:
    raise ConfigError(f"config.train.upcycle_from={source!r} holds no checkpointed run "
                      "(config.json and checkpoints/)")
  with open(path) as f:
    dense = json.load(f)
  if dense["model"]["moe"]["router"] != "dense":
    raise ConfigError(f"config.train.upcycle_from={source!r} is a run with model.moe.router="
                      f"{dense['model']['moe']['router']!r}; upcycling starts from 'dense'")
  for field in SHAPE_FIELDS:
    if config.model[field] != dense["model"][field]:
      raise ConfigError(f"config.model.{field}={config.model[field]!r} differs from the dense "
                        f"run's {dense['model'][field]!r} ({path}); upcycling copies its "
                        "parameters")
  if config.data.name != dense["data"]["name"] or (
      config.model.name == "lm" and config.data.seq_len != dense["data"]["seq_len"]):
    raise ConfigError(f"config.data.name={config.data.name!r}, seq_len={config.data.seq_len} "
                      f"must match the dense run's {dense['data']['name']!r}, "
                      f"{dense['data']['seq_len']} ({path})")
  if moe.expert_hidden_dim != dense["model"]["mlp_dim"]:
    raise ConfigError(f"config.model.moe.expert_hidden_dim={moe.expert_hidden_dim} must equal "
                      f"the dense run's config.model.mlp_dim={dense['model']['mlp_dim']}: "
                      "every expert starts as a copy of its MLP")


def load_dense_params(workdir: str) -> dict:
  """The parameters of the latest checkpoint in `workdir` (host arrays)."""
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]["params"]


def upcycle_params(moe_params: dict, dense_params: dict, granularity: int = 1) -> dict:
  """MoE parameters from dense ones: `moe_params` (freshly initialized) supplies the routers.

  An MoE block's expert kernels [E, ...] are its dense kernel block_<i>/mlp/mlp/<name> [...]
  repeated E times; every path outside the MoE layers is copied from `dense_params`.

  granularity m > 1 (granular upcycling, Megatron's --moe-upcycling-granularity; the model's
  model.moe.granularity): E = c m experts of width H / m; expert i m + j is slice j of copy i of
  the dense MLP (hidden units j H / m to (j + 1) H / m), its output kernel times m, and the m
  slices of a copy share one router column (the fresh kernel's column i m), so they are chosen
  together with gates (p_i / m) / sum of the chosen copies' p: MoE(x) = MLP(x) at step 0 when
  no choice is dropped.
  """
  dense = flax.traverse_util.flatten_dict(dense_params)
  m = granularity

  def source(path, fresh):
    if "moe" not in path:
      return jnp.asarray(dense[path])
    block, _, part, *name = path  # block_<i>, 'moe', 'router' | 'experts', kernel path
    if part == "router":
      if m == 1 or name != ["logits", "kernel"]:
        return fresh
      return jnp.repeat(fresh[:, ::m], m, axis=1)  # [M, E]: copy i's column for its m slices
    kernel = jnp.asarray(dense[(block, "mlp", "mlp", *name)])  # [M, H] or [H, M]
    slice_axis = 0 if name[-1] == "wo" else 1  # the hidden axis H
    slices = jnp.stack(jnp.split(kernel, m, axis=slice_axis))  # [m, ...]
    if name[-1] == "wo":
      slices = slices * m
    return jnp.tile(slices, (fresh.shape[0] // m,) + (1,) * kernel.ndim)

  flat = flax.traverse_util.flatten_dict(moe_params)
  return flax.traverse_util.unflatten_dict({path: source(path, value)
                                            for path, value in flat.items()})
