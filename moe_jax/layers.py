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
# Routers without a learned softmax over experts: logit jitter and noise do not apply.
UNNOISED_ROUTERS = ("soft", "hash", "random")


def _allowed(values) -> str:
  return ", ".join(map(repr, values))


def check_choice(owner: str, field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{owner}.{field}={value!r} is unknown; allowed: {_allowed(allowed)}")


def _mlp(x: Array, kernels, activation: str, spec_in: str, spec_out: str, dtype) -> Array:
  """The MLP on x with kernels (w_in,) or (w_gate, w_up) for swiglu, then w_out."""
  x = x.astype(dtype)
  project_in = lambda kernel: jnp.einsum(spec_in, x, kernel.astype(dtype))
  if activation == "swiglu":
    hidden = nn.silu(project_in(kernels[0])) * project_in(kernels[1])
  else:
    hidden = (nn.gelu if activation == "gelu" else nn.relu)(project_in(kernels[0]))
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


class FeedForward(nn.Module):
  """Two-layer MLP, or E of them stacked when num_experts is set.

  Dense: x [..., M] -> [..., M] with wi [M,H], wo [H,M].
  Experts: x [G,E,C,M] -> [G,E,C,M] with wi [E,M,H], wo [E,H,M] (swiglu: wi_gate and wi_up),
  run expert-parallel by `expert_parallel` (see sharding.run_experts).
  Parameters are float32 with logical axes ('expert',) 'embed', 'mlp'; the matmuls run in `dtype`.
  """
  hidden_dim: int
  activation: str = "gelu"
  num_experts: Optional[int] = None
  dtype: Any = jnp.float32
  expert_parallel: str = "none"

  @nn.compact
  def __call__(self, x: Array) -> Array:
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
      return _mlp(x, kernels, self.activation, "...m,mh->...h", "...h,hm->...m", self.dtype)
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
    group_size: S, tokens routed together (effective S = min(S, number of tokens)).
    dispatch_path: 'einsum' (dense masks) or 'index' (gather/scatter); same result.
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
  group_size: int = 256
  dispatch_path: str = "einsum"
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
      if getattr(self, field) < 1:
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
    return self.k or ROUTERS[self.router][1] or 1

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
    groups, group_mask = dispatch_lib.group_tokens(x, token_mask, self.group_size)
    group_ids = None
    if self.router == "hash":
      if token_ids is None or self.num_token_ids is None:
        raise ValueError("MoeLayer.router='hash' routes by token id: call it with token_ids "
                         "and set num_token_ids (the id range)")
      group_ids = dispatch_lib.group_tokens(token_ids[..., None], None, self.group_size)[0][..., 0]
    capacity = self.capacity(groups.shape[1], deterministic)
    routing = self._make_router()(groups, capacity=capacity, token_mask=group_mask,
                                  token_ids=group_ids, deterministic=deterministic)
    buffers = dispatch_lib.dispatch(groups.astype(self.dtype), routing, self.dispatch_path)
    expert_out = FeedForward(self.expert_hidden_dim, self.activation,
                             num_experts=self.num_experts, dtype=self.dtype,
                             expert_parallel=self.expert_parallel, name="experts")(buffers)
    y = dispatch_lib.combine(expert_out, routing, self.dispatch_path)
    y = dispatch_lib.ungroup_tokens(y, x.shape)

    self.sow("losses", "load_balance_loss", routing.aux_loss)
    self.sow("losses", "z_loss", routing.z_loss)
    self.sow("routing_stats", "stats", routing_statistics(routing, group_mask))
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
