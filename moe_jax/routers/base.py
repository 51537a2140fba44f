"""The router interface, and the registry that picks a router by name (letters: routing.py).

A router is a linen module, x [G,S,M] -> a routing form (routing.TokenChoices, ExpertSlots,
SoftSlots or MergeWeights). MoeLayer builds it by name from the registry. The router's class
says what it is (the class attributes of `Router`, read before anything is built), owns its
hyperparameters (the dataclass fields it declares: its settings, `model.moe.<name>.<field>` in a
config), checks them against the layer it sits in (`check`), and answers the layer's questions:
its capacity, its cost, the settings of its paper. It may keep state outside the gradient
(`state`, updated by `update_state` in training steps), and declare statistics (`statistics`,
`statistic_sums`) and losses of its own (`losses`, `add_loss`). A new router is one file that
registers itself, e.g. examples/temperature_router.py, or examples/centroid_router.py (state, a
statistic and a loss; the file is also its config):

  @routers.register("temperature")
  class TemperatureRouter(routers.TokensChooseRouter):
    init_temperature: float = 1.0   # a setting: model.moe.temperature.init_temperature
    def score(self, logits): ...
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routing import FORMS, RoutingOutput, expert_capacity, router_z_loss
from moe_jax.validation import allowed, check_choice

Array = jax.Array

__all__ = ["COUNTS", "LEGACY_STATE", "Loss", "REGISTRY", "REPLAY", "ROUTER_DTYPES", "Router",
           "RouterCost", "STATE", "Statistic", "TRACE", "batch_total", "get", "import_module",
           "loss_weights", "names", "register", "renamed_state", "replayed_choices"]

REGISTRY: Dict[str, Type["Router"]] = {}
COUNTS = "batch_counts"  # the collection of batch_total's counts
# Routing trace and replay: MoeLayer records its choices in TRACE when the collection is
# mutable; a router that `replays` takes recorded choices from REPLAY (replayed_choices).
TRACE = "routing_trace"
REPLAY = "routing_replay"
ROUTER_DTYPES = ("float32", "float64")
# The routers' state outside the gradient (loss_free's bias, ReMoE's L1 weight, StableMoE's step
# and frozen router, ...): model state, checkpointed, updated by training steps (Router.state).
STATE = "router_state"
LEGACY_STATE = "router_bias"  # STATE's name in checkpoints written before it was renamed


def renamed_state(tree: Dict[str, Any]) -> Dict[str, Any]:
  """A checkpoint's tree (train state or model variables) with its LEGACY_STATE entry, if any,
  under STATE: checkpoints written before the rename restore."""
  return {STATE if key == LEGACY_STATE else key: value for key, value in tree.items()}


class Statistic(NamedTuple):
  """A routing statistic of a router's own (Router.statistics), logged per MoE layer beside the
  layer's (train/routing/<layer>/<name>).

  It is a ratio of two sums over a call's tokens or groups (Router.statistic_sums): over the
  micro-batches of a step the sums add, so the statistic is the whole batch's; over the logging
  interval it is averaged, and sweeps average it over the MoE layers, as every routing statistic.
  """
  name: str
  direction: int = 0  # +1: higher is better, -1: lower is better, 0: neither (compare.py's)


class Loss(NamedTuple):
  """A loss of a router's own (Router.losses, sown by Router.add_loss), logged as train/<name>
  and added to the train loss summed over the MoE layers (micro-batches: weighed by their share
  of the batch, as the balancing losses) times the config field train.<name>_weight."""
  name: str
  weight: float  # the default of train.<name>_weight


def statistic_directions(router_names=None) -> Dict[str, int]:
  """{statistic name: its direction} of the routers' own statistics (Router.statistics): those of
  `router_names`, or of every registered router."""
  classes = REGISTRY.values() if router_names is None else map(get, router_names)
  return {stat.name: stat.direction for cls in classes for stat in cls.statistics}


def loss_weights() -> Dict[str, Tuple[str, float]]:
  """{loss name: (its train config field, default weight)} of the registered routers' losses."""
  return {loss.name: (f"{loss.name}_weight", loss.weight)
          for cls in REGISTRY.values() for loss in cls.losses}


def batch_total(module: nn.Module, name: str, local: Array) -> Array:
  """`local`, counts over the tokens of this call, summed over the whole batch of a train step.

  With gradient accumulation (train.microbatches > 1) the train step first runs every
  micro-batch forward with the COUNTS collection mutable: each call stores its `local` there;
  the step sums them over the micro-batches and passes the totals in, where this returns them.
  Otherwise (one micro-batch, evaluation, analysis) the call's tokens are the batch: `local`.
  """
  if module.has_variable(COUNTS, name):
    return module.get_variable(COUNTS, name)
  if module.is_mutable_collection(COUNTS) and not module.is_initializing():
    module.put_variable(COUNTS, name, local)
  return local


def replayed_choices(module: nn.Module) -> Optional[Array]:
  """[G,S,K] recorded choices to route by instead of the module's own (a routing trace's, E for
  no choice), when the call was given them in REPLAY; else None."""
  if module.has_variable(REPLAY, "choices"):
    return module.get_variable(REPLAY, "choices")
  return None


def register(name: str):
  """Class decorator: the router becomes MoeLayer(router=name), model.moe.router=name in a config,
  with its settings under model.moe.<name>."""

  def add(cls):
    known = REGISTRY.get(name)
    # A module imported again (a notebook's reload, a config file that is also the router's
    # module: ml_collections loads it as 'config_config') registers its class again: replace it.
    if known is not None and (known.__qualname__, _source(known)) != (cls.__qualname__,
                                                                       _source(cls)):
      raise ValueError(f"router name {name!r} is taken by {known.__module__}."
                       f"{known.__qualname__}")
    check_choice(cls.__qualname__, "form", cls.form, FORMS)
    cls.router_name = name
    REGISTRY[name] = cls
    return cls

  return add


def _source(cls) -> Optional[str]:
  """The real path of the file that defines `cls` (None where it has none)."""
  try:
    return os.path.realpath(inspect.getfile(cls))
  except (TypeError, OSError):
    return None


def names() -> tuple:
  """The registered router names, in registration order (the built-in ones first)."""
  return tuple(REGISTRY)


def get(name: str, owner: str = "MoeLayer") -> Type["Router"]:
  """The router class registered as `name`; a one-line error naming `owner`.router otherwise."""
  check_choice(owner, "router", name, REGISTRY)
  return REGISTRY[name]


def import_module(module: Optional[str]) -> None:
  """Imports `module` (a dotted path, e.g. 'examples.temperature_router'), which registers the
  routers it defines; nothing for None or ''. What model.moe.router_module names.

  A file already loaded under another name (the --config file, which ml_collections loads as
  'config_config') is that module: it is not imported a second time.
  """
  if not module or module in sys.modules:
    return
  try:
    spec = importlib.util.find_spec(module)
    origin = spec and spec.origin and os.path.realpath(spec.origin)
    loaded = next((m for m in list(sys.modules.values())
                   if origin and os.path.realpath(getattr(m, "__file__", None) or "") == origin),
                  None)
    if loaded is not None:
      sys.modules[module] = loaded
    else:
      importlib.import_module(module)
  except ImportError as error:
    raise ValueError(f"model.moe.router_module={module!r} does not import: {error}") from error


class RouterCost(NamedTuple):
  """What one router costs a token, for the FLOP and parameter counts (models/common.py)."""
  params: float  # router parameters of the layer
  flops_per_token: float  # routing FLOPs per token (forward)
  experts_per_token: float  # mean experts that process a token (k, or what capacity gives)


class Router(nn.Module):
  """Base router: x [G,S,M] -> routing form; capacity None: no capacity (the dropless path).

  The base computes logits in router_dtype (x W, or a subclass's `compute_logits`), their
  probabilities (`score`) and the z-loss; subclasses turn the probabilities into a decision
  (`assign`), or the logits when they need them (`route`). Routers without per-expert logits
  override `__call__` (Soft MoE, the fixed routers).

  Fields set by MoeLayer, the same for every router (not settings):
    num_experts: E.
    k: choices per token (MoeLayer.k or the router's default_k); None for routers with no k.
    init_scale: variance scale of the truncated-normal router kernel over fan-in; 0.1 is Switch's
      init (std sqrt(0.1 / M)).
    jitter_eps: multiplicative input jitter U(1 - eps, 1 + eps) in training (Switch: 1e-2).
    noise_std: std of Gaussian noise added to the logits in training (V-MoE: 1 / E).
    batch_prioritized: tokens-choose routers fill slots by descending top-1 probability.
    num_ids: the range of the token ids (routers with uses_token_ids), or the number of domains
      (uses_domains).
    router_dtype: 'float32' or 'float64' (ROUTER_DTYPES): the dtype of the logits, the scores
      and the top-k choice and gate sums of the routers that compute them here (compute_logits;
      not Soft MoE, the fixed or cosine routers); the decision they return is float32. float64
      needs 64-bit JAX (JAX_ENABLE_X64=1): jax.enable_x64 around the router alone runs its
      forward pass but not its gradient (the transposed gathers make float32 zeros).
  Jitter and noise apply only when not deterministic and draw from the 'routing' rng stream.

  State, statistics and losses of a router's own:
    state(name, init_fn, *args): a variable of the STATE collection (never differentiated,
      checkpointed), init_fn(rng, *args) drawing from the 'params' stream at init.
    update_state(x, routing, token_mask): called by `__call__` in training steps (not
      deterministic, not init, STATE mutable) with the tokens and the decision; it sets the state
      variables (sums over the whole batch through batch_total). Routers that override
      `__call__` call it themselves (`trains_state`).
    statistics + statistic_sums(routing, token_mask): the router's own routing statistics.
    losses + add_loss(name, value): the router's own losses, each under its own weight.
  """
  # What the router is (class attributes, read before anything is built):
  router_name: ClassVar[str] = ""  # set by `register`
  default_k: ClassVar[Optional[int]] = 1  # choices per token; None: none (capacity decides)
  fixed_k: ClassVar[bool] = False  # k must be default_k (e.g. Switch is top-1)
  form: ClassVar[str] = "choices"  # the routing form it returns (routing.FORMS)
  causal_safe: ClassVar[bool] = True  # a token's route reads no later token of its group
  learned: ClassVar[bool] = True  # a learned softmax over experts: jitter and noise apply
  prioritizes: ClassVar[bool] = False  # batch_prioritized applies
  uses_token_ids: ClassVar[bool] = False  # routes by the ids the model passes (num_ids)
  # Routes by each token's domain (num_ids domains): the layer passes it as token_ids.
  uses_domains: ClassVar[bool] = False
  needs_group_size: ClassVar[bool] = False  # group_size=None (automatic) does not suit it
  replays: ClassVar[bool] = False  # can route by recorded choices (replayed_choices)
  # Takes the previous MoE layer's router logits (`carried_term`, MoE++'s gating residual) and
  # returns its own in its routing output's `logits` (routing.ZeroComputeChoices).
  carries_logits: ClassVar[bool] = False
  in_zoo: ClassVar[bool] = True  # a member of the zoo sweep (configs/common.zoo)
  # The experts per token configs/common sizes the experts for at equal active FLOPs, where it
  # is neither default_k nor the capacity factor (a router whose count varies per token).
  equal_flops_experts: ClassVar[Optional[float]] = None
  statistics: ClassVar[Tuple[Statistic, ...]] = ()  # its own, from statistic_sums
  losses: ClassVar[Tuple[Loss, ...]] = ()  # its own, sown by add_loss

  num_experts: int
  k: Optional[int] = None
  init_scale: float = 0.1
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  batch_prioritized: bool = False
  num_ids: Optional[int] = None
  router_dtype: str = "float32"

  @classmethod
  def settings(cls) -> Dict[str, Any]:
    """The router's own hyperparameters with their defaults: the fields it declares beyond
    Router's."""
    shared = {field.name for field in dataclasses.fields(Router)}
    return {field.name: field.default for field in dataclasses.fields(cls)
            if field.name not in shared}

  @classmethod
  def paper_config(cls, num_experts: int) -> Dict[str, Any]:
    """Config fields (dotted paths) that the router's paper sets, applied by configs/common.py;
    e.g. V-MoE's noise std 1 / E."""
    del num_experts
    return {}

  def setting_error(self, field: str, why: str) -> ValueError:
    """A one-line error about one of this router's own settings."""
    return ValueError(f"MoeLayer.{self.router_name}.{field}={getattr(self, field)!r} {why}")

  def check(self, layer) -> None:
    """Raises a one-line ValueError for a setting that cannot work in `layer` (the MoeLayer that
    holds the router; its fields are final). Subclasses add their own checks, calling super."""
    name = self.router_name
    if self.fixed_k and self.k != self.default_k:
      raise ValueError(f"MoeLayer.k={self.k}: router={name!r} always chooses {self.default_k} "
                       f"expert{'s' if self.default_k > 1 else ''}; use router='topk' for "
                       f"k={self.k}")
    if not self.learned and (self.jitter_eps or self.noise_std):
      raise ValueError(f"MoeLayer.jitter_eps={self.jitter_eps} and noise_std={self.noise_std} "
                       f"must be 0 for router={name!r} (no learned softmax over experts)")
    if self.batch_prioritized and not self.prioritizes:
      prioritizing = [n for n, cls in REGISTRY.items() if cls.prioritizes]
      raise ValueError(f"MoeLayer.batch_prioritized applies to the routers "
                       f"{allowed(prioritizing)}, not router={name!r}")
    if self.batch_prioritized and layer.causal:
      raise ValueError("MoeLayer.batch_prioritized orders tokens by probability across the "
                       "group and reads future tokens; not allowed with causal=True")
    if self.needs_group_size and layer.group_size is None:
      raise ValueError(f"MoeLayer.group_size=None (automatic) does not suit router={name!r}; "
                       "set it")

  def capacity(self, layer, group_size: int, deterministic: bool) -> int:
    """C for a group of `group_size` tokens in `layer`: max(min_capacity, ceil(k cf S / E)),
    cf the layer's capacity factor (in evaluation its eval_capacity_factor), at most S."""
    factor = layer.eval_capacity_factor if deterministic else layer.capacity_factor
    return min(group_size, expert_capacity(group_size, layer.num_experts, layer.num_selected,
                                           factor, layer.min_capacity))

  def cost(self, layer, model_dim: int) -> RouterCost:
    """The router kernel [M,E] and its logits; k experts per token."""
    params = model_dim * layer.num_experts
    return RouterCost(params, 2 * params, layer.num_selected)

  @nn.compact
  def __call__(self, x: Array, *, capacity: Optional[int],
               token_mask: Optional[Array] = None, token_ids: Optional[Array] = None,
               deterministic: bool = False,
               carried_logits: Optional[Array] = None) -> RoutingOutput:
    """x [G,S,M], token_mask [G,S], token_ids [G,S] (uses_token_ids or uses_domains only),
    carried_logits [G,S,E'] (carries_logits only: the previous MoE layer's logits; None in the
    first) -> routing form."""
    dtype = jnp.dtype(self.router_dtype)
    tokens = x = x.astype(dtype)
    if self.jitter_eps > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("routing"), x.shape, dtype,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    clean_logits = self.compute_logits(x)
    if carried_logits is not None:
      clean_logits = clean_logits + self.carried_term(carried_logits.astype(dtype))
    if token_ids is not None:
      clean_logits = self.restrict(clean_logits, token_ids)
    logits = clean_logits
    if self.noise_std > 0 and not deterministic:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("routing"),
                                                           logits.shape, dtype)
    self.sow("intermediates", "router_logits", logits)  # where 'intermediates' is mutable
    routing = self.route(logits, clean_logits=clean_logits, capacity=capacity,
                         token_mask=token_mask, deterministic=deterministic)
    routing = self.finish(routing, logits, token_mask)
    if self.trains_state(deterministic):
      self.update_state(tokens, routing, token_mask)
    return routing

  def trains_state(self, deterministic: bool) -> bool:
    """Whether this call is a training step that moves the router's state: not deterministic,
    STATE mutable, and not init (which makes every collection mutable)."""
    return (not deterministic and self.is_mutable_collection(STATE)
            and not self.is_initializing())

  def state(self, name: str, init_fn: Callable[..., Array], *init_args) -> nn.Variable:
    """The router's state variable `name` (collection STATE: checkpointed, never differentiated,
    moved only by update_state); at init it is init_fn(rng, *init_args), rng drawn from the
    'params' stream (a flax initializer: nn.initializers.normal(1.0), (E, D), jnp.float32)."""
    return self.variable(STATE, name, lambda: init_fn(self.make_rng("params"), *init_args))

  def update_state(self, x: Array, routing: RoutingOutput, token_mask: Optional[Array]) -> None:
    """The training steps' hook: x [G,S,M] the tokens (router_dtype, before jitter), routing the
    decision (float32), token_mask [G,S]. Sets the state variables; nothing by default.

    With micro-batches, each micro-batch's call starts from the step's state and the last one's
    update is kept: counts over the whole batch go through batch_total."""
    del x, routing, token_mask

  def statistic_sums(self, routing: RoutingOutput,
                     token_mask: Array) -> Dict[str, Tuple[Array, Array]]:
    """{name: (numerator [], denominator [])} for each of `statistics`, sums over the call's
    real tokens of token_mask [G,S] (or its groups); the statistic is numerator / denominator
    (0 where the denominator is 0). None by default."""
    del routing, token_mask
    return {}

  def add_loss(self, name: str, value: Array) -> None:
    """Sows `value` [] as the router's loss `name`, one of its `losses`."""
    declared = [loss.name for loss in self.losses]
    if name not in declared:
      raise ValueError(f"{type(self).__name__}.add_loss({name!r}): its losses (Router.losses) "
                       f"are {allowed(declared) or 'none'}")
    self.sow("losses", name, jnp.asarray(value, jnp.float32))

  @nn.nowrap
  def side_output(self, x: Array, routing: RoutingOutput, dtype) -> Optional[Array]:
    """x [G,S,M] (the layer's compute dtype) -> [G,S,M] added to the experts' output, or None
    (the default). Modules built here sit in the layer's scope, beside its experts (MoE++'s
    zero-computation experts): an override is an nn.nowrap method too."""
    del x, routing, dtype
    return None

  def finish(self, routing: RoutingOutput, logits: Array,
             token_mask: Optional[Array]) -> RoutingOutput:
    """The decision with the z-loss and the largest logit of logits [G,S,E] over the real tokens
    of token_mask [G,S], its arrays in float32."""
    real = (jnp.ones(logits.shape[:-1], bool) if token_mask is None
            else token_mask.astype(bool))[..., None]
    routing = routing.replace(z_loss=router_z_loss(logits, token_mask),
                              max_logit=jnp.max(jnp.where(real, logits, -jnp.inf)))
    # The decision leaves in float32: the experts, losses and statistics compute in it.
    return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a,
                        routing)

  def compute_logits(self, x: Array) -> Array:
    """x [G,S,M] -> [G,S,E] logits before any noise: x W, in x's dtype (router_dtype)."""
    return self.logits_kernel("logits", x.dtype)(x)

  def logits_kernel(self, name: str, dtype) -> nn.Dense:
    """A bias-free Dense to the router's num_experts logits, its kernel init_scale's truncated
    normal over fan-in."""
    kernel_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    return nn.Dense(self.num_logits, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, name=name)

  def restrict(self, logits: Array, token_ids: Array) -> Array:
    """logits [G,S,E], token_ids [G,S] -> the logits with the experts a token may not choose at
    -inf (the domain router keeps its domain's); routers given ids route by them otherwise."""
    del token_ids
    return logits

  @property
  def num_logits(self) -> int:
    """The logits the router computes: E (MoE++ adds its zero-computation experts)."""
    return self.num_experts

  def score(self, logits: Array) -> Array:
    """[G,S,E] float32 logits -> the scores `assign` routes by (router probabilities)."""
    return jax.nn.softmax(logits, axis=-1)

  def route(self, logits: Array, *, clean_logits: Array, capacity: Optional[int],
            token_mask: Optional[Array], deterministic: bool) -> RoutingOutput:
    """logits [G,S,E] (after noise), clean_logits [G,S,E] (before) -> routing form.

    Default: `assign` on the scores of the logits. Routers that need the logits themselves
    (V-MoE's load loss, BASE's sigmoid gate) override this.
    """
    del clean_logits
    return self.assign(self.score(logits), capacity=capacity, token_mask=token_mask,
                       deterministic=deterministic)

  def assign(self, probs: Array, *, capacity: Optional[int], token_mask: Optional[Array],
             deterministic: bool) -> RoutingOutput:
    """probs [G,S,E] float32 scores, token_mask [G,S] -> routing form."""
    raise NotImplementedError(f"{type(self).__qualname__} implements neither assign nor route")
