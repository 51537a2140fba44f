"""The MoE layer and its dense baseline (letters: see routing.py).

MoeLayer reads as its pipeline: group the tokens -> route (the router named by `router`, built
from the registry in routers/, float32) -> dispatch to the experts (dispatch.py: capacity
buffers, the dropless plan of rows sorted by expert, or none for merged experts) -> the experts
(experts.py) -> combine -> ungroup, plus optional always-on shared experts. It sows, for the
training loop:
  'losses':        load_balance_loss, seq_balance_loss, global_balance_loss, z_loss
                   (float32 scalars), and the router's own losses (router/<name>)
  'routing_stats': stats                       (dict from metrics.statistics, the router's own
                                               statistics included)
  'routing_sums':  sums                        (their additive totals, metrics.routing_sums)
  'routing_trace': choices [G,S,K] int8 (int16 for E > 127; the router's choices before capacity,
                   E for none), kept [G,S,K] bool (got a slot), gates [G,S,K] float32 (combine
                   weights): the routing trace, only when the collection is mutable and the
                   router's tokens choose (train.trace_steps)
Read them with `model.apply(..., mutable=['losses', 'routing_stats'])`. Routers with state
outside the gradient keep it in the 'router_state' collection (routers.STATE: loss_free's bias,
ReMoE's L1 weight, StableMoE's step count and frozen distilled router), updated by a training
call that lists the collection as mutable (routers.Router.update_state).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from moe_jax import dispatch as dispatch_lib
from moe_jax import metrics, routers, sharding
from moe_jax import routing as routing_lib
from moe_jax.experts import ACTIVATIONS, FeedForward
from moe_jax.validation import allowed, check_choice

Array = jax.Array

__all__ = ["DenseFFN", "MoeLayer"]


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
               token_ids: Optional[Array] = None, domain_ids: Optional[Array] = None,
               deterministic: bool = False) -> Array:
    del token_mask, token_ids, domain_ids, deterministic  # same signature as MoeLayer
    return FeedForward(self.hidden_dim, self.activation, dtype=self.dtype, name="mlp")(x)


class MoeLayer(nn.Module):
  """Mixture-of-Experts feed-forward layer: x [..., M] -> [..., M].

  Attributes:
    num_experts: E.
    expert_hidden_dim: H of each expert.
    router: a registered router name (routers.names(): 'switch', 'gshard', 'topk', 'vmoe'
      (noisy top-k), 'expert_choice', 'soft' (Soft MoE), 'hash', 'random', 'base' (BASE layers),
      'loss_free' (DeepSeek's auxiliary-loss-free balancing), and any router registered by a
      module of your own).
    router_settings: the router's own settings (its class's `settings()`), e.g.
      {'second_expert_policy': 'all'} for gshard; the router's defaults for the rest.
    k: choices per token (None: the router's default_k; not used by routers without one, such
      as expert_choice and soft).
    capacity_factor: cf in training; eval_capacity_factor when deterministic. C = max(
      min_capacity, ceil(k cf S / E)), at most S; routers may size it otherwise (expert choice:
      cf is its mean experts per token; soft: slots from the configured group size; BASE: S / E
      in training), see their `capacity`.
    min_capacity: lower bound on C.
    group_size: S, tokens routed together (effective S = min(S, number of tokens)); None picks
      it from the einsum cost model (dispatch.auto_group_size), at least min_capacity E / (k cf)
      so that cf, not min_capacity, sets the capacity.
    dispatch_path: 'index' (gathers; the default) or 'einsum' (dense masks), same result, index
      the faster on XLA:CPU (the default configs' train steps, BENCHMARKS.md); or
      'dropless' (no capacity: every choice is processed; expert-parallel with 'shard_map'
      only); or 'merge' (SMEAR's merged experts: one FFN per group, not expert-parallel). Each
      takes the routing forms of dispatch.PATH_FORMS (soft routing: einsum only; dropless:
      routers whose tokens choose; merge: the merge form alone).
    dropless_form: 'ragged_dot' | 'chunks' | 'blocks' | 'tokamax' for the dropless path; None
      picks by backend (dispatch.default_dropless_form: tokamax on a GPU it supports). Under
      forward-mode autodiff (jax.jvp, Hessian-vector products) 'chunks' (the CPU default) and
      'tokamax' (custom_vjps both) run as 'ragged_dot', the same math.
    activation: 'gelu' | 'relu' | 'swiglu'.
    num_shared_experts: always-on experts of width H added to the output (DeepSeekMoE).
    shared_expert_gate: scale the shared experts' output per token by sigmoid(x w_g), w_g [M,1]
      learned (Qwen-MoE; Megatron's moe_shared_expert_gate).
    residual: Residual-MoE (PR-MoE, Rajbhandari et al. 2022), as DeepSpeed implements it: a dense
      MLP of width H beside the experts; output = c_0 * MoE(x) + c_1 * MLP(x) with a learned
      per-token c = softmax(x W_c + b_c) over 2. (The paper's plain sum MLP(x) + MoE(x) is
      num_shared_experts=1 instead.)
    dtype: compute dtype of the experts (router and losses stay float32).
    router_init_scale, jitter_eps, noise_std, batch_prioritized: every router's (see
      routers.Router: init_scale, ...).
    causal: the layer sits in a causal decoder; routers that read future tokens are refused.
    num_token_ids: the range of the token_ids that routers with uses_token_ids (hash) route by
      (set by the model: LM vocabulary size, ViT tokens per image).
    num_domains: the domains of the data (set by the model from a corpus with domain labels),
      which routers with uses_domains (domain) route by; None: no labels.
    expert_parallel: 'none' | 'gspmd' | 'shard_map': how experts split over the mesh's expert
      axis (see sharding.py); acts only under `jax.set_mesh`.
    router_dtype: 'float32' | 'float64': the router's logits, scores, top-k choice and gate sums
      (routers.Router.router_dtype; float64 needs JAX_ENABLE_X64=1; Megatron's moe_router_dtype);
      its decision and everything else keep their dtypes.
  """
  num_experts: int
  expert_hidden_dim: int
  router: str = "switch"
  router_settings: Mapping[str, Any] = FrozenDict()
  k: Optional[int] = None
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: Optional[int] = None
  dispatch_path: str = "index"
  dropless_form: Optional[str] = None
  activation: str = "gelu"
  num_shared_experts: int = 0
  shared_expert_gate: bool = False
  residual: bool = False
  dtype: Any = jnp.float32
  router_init_scale: float = 0.1
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  batch_prioritized: bool = False
  causal: bool = False
  expert_parallel: str = "none"
  num_token_ids: Optional[int] = None
  num_domains: Optional[int] = None
  router_dtype: str = "float32"

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self):
    """Every check of the layer and its router, once, when the layer is built."""
    name = "MoeLayer"
    router_cls = routers.get(self.router)
    check_choice(name, "dispatch_path", self.dispatch_path, dispatch_lib.DISPATCH_PATHS)
    if self.dropless_form is not None:
      check_choice(name, "dropless_form", self.dropless_form, dispatch_lib.DROPLESS_FORMS)
    check_choice(name, "activation", self.activation, ACTIVATIONS)
    check_choice(name, "expert_parallel", self.expert_parallel, sharding.EXPERT_PARALLEL)
    check_choice(name, "router_dtype", self.router_dtype, routers.ROUTER_DTYPES)
    if self.router_dtype == "float64" and not jax.config.jax_enable_x64:
      raise ValueError(f"{name}.router_dtype='float64' needs 64-bit JAX: run with "
                       "JAX_ENABLE_X64=1 (the model's other dtypes stay as configured)")
    for field in ("num_experts", "expert_hidden_dim", "group_size", "min_capacity"):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise ValueError(f"{name}.{field}={getattr(self, field)} must be a positive integer")
    for field in ("capacity_factor", "eval_capacity_factor"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{name}.{field}={getattr(self, field)} must be > 0")
    if self.num_shared_experts < 0:
      raise ValueError(f"{name}.num_shared_experts={self.num_shared_experts} must be >= 0")
    if self.shared_expert_gate and not self.num_shared_experts:
      raise ValueError(f"{name}.shared_expert_gate gates the shared experts; "
                       "num_shared_experts=0")
    if self.jitter_eps < 0 or self.noise_std < 0:
      raise ValueError(f"{name}.jitter_eps={self.jitter_eps} and noise_std={self.noise_std} "
                       "must be >= 0")
    own = router_cls.settings()
    for key in self.router_settings:
      if key not in own:
        raise ValueError(f"{name}.{self.router}.{key} is not a setting of router="
                         f"{self.router!r}; its settings: {allowed(own) if own else 'none'}")
    if self.causal and not router_cls.causal_safe:
      causal_safe = [r for r, cls in routers.REGISTRY.items() if cls.causal_safe]
      raise ValueError(f"{name}.router={self.router!r} reads future tokens and is invalid in a "
                       f"causal decoder; allowed there: {allowed(causal_safe)}")
    path_forms = dispatch_lib.PATH_FORMS[self.dispatch_path]
    if router_cls.form not in path_forms:
      paths = [p for p, forms in dispatch_lib.PATH_FORMS.items() if router_cls.form in forms]
      raise ValueError(f"{name}.dispatch_path={self.dispatch_path!r} takes the routing forms "
                       f"{allowed(path_forms)}, not the {router_cls.form!r} form of router="
                       f"{self.router!r}; allowed paths for it: {allowed(paths)}")
    if router_cls.default_k is None:
      if self.k is not None:
        raise ValueError(f"{name}.k={self.k} is not used by router={self.router!r}; set "
                         "capacity_factor (mean experts per token) instead")
    elif not 1 <= self.num_selected <= self.num_experts:
      raise ValueError(f"{name}.k={self.num_selected} must be in [1, num_experts="
                       f"{self.num_experts}]")
    self._router(parent=None).check(self)

  def _router(self, **module_args) -> routers.Router:
    """The router module, from the registry, with the layer's shared fields and its settings."""
    router_cls = routers.get(self.router)
    shared = dict(num_experts=self.num_experts, init_scale=self.router_init_scale,
                  jitter_eps=self.jitter_eps, noise_std=self.noise_std,
                  batch_prioritized=self.batch_prioritized,
                  num_ids=self.num_domains if router_cls.uses_domains else self.num_token_ids,
                  router_dtype=self.router_dtype)
    if router_cls.default_k is not None:
      shared["k"] = self.num_selected
    return router_cls(**shared, **self.router_settings, **module_args)

  @property
  def num_selected(self) -> int:
    """k for routers that choose k; 1 for the others (expert choice, soft: the capacity formula's
    k = 1)."""
    if self.k is not None:  # k=0 is an error (_validate), not "the router's default"
      return self.k
    return routers.get(self.router).default_k or 1

  def resolved_group_size(self, num_tokens: int) -> int:
    """S for a batch of `num_tokens` tokens: group_size, or the auto choice when it is None."""
    if self.group_size is not None:
      return self.group_size
    # Below S = min_capacity E / (k cf) the capacity floor, not cf, sets C and the experts
    # compute mostly empty slots: at E = 8, H = 64, top-1 the cost bound alone gives S = 6 and
    # 5.3 slots per token instead of cf = 1.25. (Rounded down: C is then min_capacity.)
    floor = 1 if self.dispatch_path not in dispatch_lib.CAPACITY_PATHS else int(
        self.min_capacity * self.num_experts / (self.num_selected * self.capacity_factor))
    return dispatch_lib.auto_group_size(num_tokens, dispatch_lib.expert_matrices(self.activation),
                                        self.expert_hidden_dim, min_size=floor)

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """C for a group of `group_size` tokens (the router's `capacity`), never more than S."""
    return self._router(parent=None).capacity(self, group_size, deterministic)

  def router_cost(self, model_dim: int) -> routers.RouterCost:
    """The router's parameters, FLOPs per token and experts per token in this layer."""
    return self._router(parent=None).cost(self, model_dim)

  def _segment_balance_losses(self, routing, shape: tuple, group_size: int,
                              group_mask: Array) -> dict:
    """The load-balancing loss over each sequence (seq_balance_loss; a sequence is the last axis
    but one of x [..., T, M]) and over the whole batch (global_balance_loss), on the router's
    choices before capacity and its scores normalized to sum to 1 (routing.
    segment_balancing_loss); divided by k under the router's balance_per_k. Routers without
    per-token choices (expert choice, soft) need no balancing: 0.

    The global loss E sum_e f_e P_e counts f over the train step's whole batch, micro-batches
    included (routers.batch_total), and P over this call's tokens divided by the batch's token
    count: given f it is linear in P, so the losses of the micro-batches sum to the batch's, and
    so do their gradients (f, counts of choices, has none)."""
    if routing.form != "choices":
      return {"seq_balance_loss": jnp.zeros((), jnp.float32),
              "global_balance_loss": jnp.zeros((), jnp.float32)}
    selected, _ = routing.token_experts()
    probs = routing.probs / jnp.maximum(routing.probs.sum(axis=-1, keepdims=True), 1e-9)
    seq_len = shape[-2] if len(shape) >= 3 else math.prod(shape[:-1])
    sequence = jnp.arange(math.prod(shape[:-1]), dtype=jnp.int32).reshape(shape[:-1]) // seq_len
    sequence = dispatch_lib.group_tokens(sequence[..., None], None, group_size)[0][..., 0]
    scale = self.num_selected if self.router_settings.get("balance_per_k") else 1
    num_sequences = math.prod(shape[:-1]) // seq_len
    seq_loss = routing_lib.segment_balancing_loss(probs, selected, sequence, num_sequences,
                                                  group_mask)
    valid = group_mask.astype(jnp.float32)[..., None]
    tokens = routers.batch_total(self, "tokens", valid.sum())
    counts = routers.batch_total(self, "selected", (selected * valid).sum(axis=(0, 1)))  # [E]
    global_loss = (self.num_experts * jnp.sum(counts * (probs * valid).sum(axis=(0, 1)))
                   / jnp.maximum(tokens, 1.0) ** 2)
    return {"seq_balance_loss": seq_loss / scale, "global_balance_loss": global_loss / scale}

  @property
  def carries_logits(self) -> bool:
    """Whether the router takes the previous MoE layer's logits and returns its own (MoE++)."""
    return routers.get(self.router).carries_logits

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None, *,
               token_ids: Optional[Array] = None, domain_ids: Optional[Array] = None,
               deterministic: bool = False, router_logits: Optional[Array] = None):
    """x [..., M], token_mask [...] (1 = real token; padding is never routed) -> [..., M].

    token_ids: [...] int in [0, num_token_ids), what routers with uses_token_ids (hash) route by
    (LM: input token ids, ViT: token positions); ignored by the other routers.
    domain_ids: [...] int in [0, num_domains), each token's domain (its sequence's label), what
    routers with uses_domains (domain) route by; ignored by the other routers.
    router_logits: [..., E'] the previous MoE layer's router logits (None: none), for a router
    that carries_logits; such a layer returns (y, its router logits [..., E+Z]).
    """
    # group
    group_size = self.resolved_group_size(math.prod(x.shape[:-1]))
    groups, group_mask = dispatch_lib.group_tokens(x, token_mask, group_size)
    # route
    router = self._router(name="router")
    group_ids = None
    if router.uses_token_ids or router.uses_domains:
      ids, what = ((domain_ids, "domain: call it with domain_ids and set num_domains (the "
                    "number of domains)") if router.uses_domains else
                   (token_ids, "token id: call it with token_ids and set num_token_ids (the id "
                    "range)"))
      if ids is None or router.num_ids is None:
        raise ValueError(f"MoeLayer.router={self.router!r} routes by {what}")
      group_ids = dispatch_lib.group_tokens(ids[..., None], None, group_size)[0][..., 0]
    capacity = (router.capacity(self, groups.shape[1], deterministic)
                if self.dispatch_path in dispatch_lib.CAPACITY_PATHS else None)
    carried = {}  # MoE++'s gating residual reads the previous MoE layer's logits
    if router.carries_logits and router_logits is not None:
      carried["carried_logits"] = dispatch_lib.group_tokens(router_logits, None, group_size)[0]
    routing = router(groups, capacity=capacity, token_mask=group_mask, token_ids=group_ids,
                     deterministic=deterministic, **carried)
    experts = FeedForward(self.expert_hidden_dim, self.activation, num_experts=self.num_experts,
                          dtype=self.dtype, expert_parallel=self.expert_parallel,
                          dropless_form=self.dropless_form or dispatch_lib.default_dropless_form(),
                          name="experts")
    inputs = groups.astype(self.dtype)
    if self.dispatch_path == "dropless":  # the pairs sorted by expert into rows (experts.py)
      dispatch_lib.check_form("dropless", routing)
      y = experts(inputs, choices=(routing.choice_expert, routing.choice_gate))
    elif self.dispatch_path == "merge":  # each group's tokens through its merged FFN
      dispatch_lib.check_form("merge", routing)
      y = experts(inputs, merge_weights=routing.merge_weights)
      y = jnp.where(group_mask[..., None], y, 0)  # padding is never routed: no output
    else:  # capacity buffers [G,E,C,M] -> experts -> combine
      buffers = dispatch_lib.to_experts(inputs, routing, self.dispatch_path)
      y = dispatch_lib.from_experts(experts(buffers), routing, self.dispatch_path)
    side = router.side_output(inputs, routing, self.dtype)  # the router's own, beside the experts
    if side is not None:
      y = y + side
    y = dispatch_lib.ungroup_tokens(y, x.shape)

    self.sow("losses", "load_balance_loss", routing.aux_loss)
    for name, loss in self._segment_balance_losses(routing, x.shape, group_size,
                                                   group_mask).items():
      self.sow("losses", name, loss)
    self.sow("losses", "z_loss", routing.z_loss)
    sums = metrics.routing_sums(routing, group_mask, router.statistic_sums(routing, group_mask))
    self.sow("routing_sums", "sums", sums)  # what the train step adds over micro-batches
    self.sow("routing_stats", "stats", metrics.statistics(sums))
    if self.is_mutable_collection("intermediates"):  # asked for by analysis, never in training
      selected, processed = routing.token_experts()
      self.sow("intermediates", "decisions",
               {"probs": routing.probs, "selected": selected, "processed": processed})
    if (routing.form == "choices" and self.is_mutable_collection(routers.TRACE)
        and not self.is_initializing()):
      self.put_variable(routers.TRACE, "choices", routing.selected_expert.astype(
          jnp.int8 if self.num_experts < 128 else jnp.int16))
      self.put_variable(routers.TRACE, "kept", routing.choice_expert < self.num_experts)
      self.put_variable(routers.TRACE, "gates", routing.choice_gate)
    if self.residual:
      mlp = FeedForward(self.expert_hidden_dim, self.activation, dtype=self.dtype,
                        name="residual_mlp")(x)
      coef = jax.nn.softmax(nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32,
                                     name="residual_coef")(x.astype(jnp.float32)), axis=-1)
      y = y * coef[..., :1] + mlp * coef[..., 1:]
    if self.num_shared_experts:
      shared = FeedForward(self.num_shared_experts * self.expert_hidden_dim, self.activation,
                           dtype=self.dtype, name="shared_experts")(x)
      if self.shared_expert_gate:
        gate = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                        name="shared_expert_gate")(x.astype(jnp.float32))
        shared = shared * jax.nn.sigmoid(gate).astype(shared.dtype)
      y = y + shared
    if router.carries_logits:
      return y.astype(x.dtype), dispatch_lib.ungroup_tokens(
          routing.logits, x.shape[:-1] + routing.logits.shape[-1:])
    return y.astype(x.dtype)
