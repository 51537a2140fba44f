"""The experiment config: every field with its default, and validation before anything compiles.

Config files in configs/ start from `default_config()` and change what they need. `validate`
rejects unknown keys, wrong types and impossible values with one-line errors naming the field.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from absl import flags
import ml_collections
from flax.core import FrozenDict
from ml_collections import config_dict, config_flags

from moe_jax import routers, sharding
from moe_jax.experts import ACTIVATIONS
from moe_jax.layers import MoeLayer
from moe_jax.models import common
from moe_jax.validation import ConfigError, allowed, call_in_file, check_choice, error_line


def default_config() -> ml_collections.ConfigDict:
  """All fields of an experiment, with defaults (a small ViT with Switch MoE on fashion_mnist)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameters, data order and routing rngs; sweeps pair groups by it

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"  # fashion_mnist | python_stdlib_bytes | multidomain_bytes | TFDS
  c.data.data_dir = config_dict.placeholder(str)  # None: $MOE_JAX_DATA_DIR or <repo>/.data/tfds
  c.data.files = config_dict.placeholder(str)  # glob of text files: a byte-level LM corpus
  c.data.seq_len = 256  # text only
  c.data.train_split = config_dict.placeholder(str)  # None: "train"
  c.data.eval_split = config_dict.placeholder(str)  # None: "test", else "validation"
  # multidomain_bytes (moe_jax/data/multidomain.py): its domains (() all), each one's size cap,
  # and the training mix: balanced (every batch holds each domain equally) | natural (by size).
  c.data.domains = ()
  c.data.max_domain_bytes = 3_000_000
  c.data.domain_mix = "balanced"

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit"  # vit | lm
  c.model.num_layers = 4  # blocks
  c.model.width = 128  # M
  c.model.num_heads = 4  # attention heads; must divide width
  c.model.mlp_dim = 512  # hidden width of the dense FFN layers
  c.model.activation = "gelu"  # gelu | relu | swiglu
  c.model.dropout = 0.0  # rate on both residual branches of every block
  c.model.dtype = "float32"  # compute dtype; params, router and losses stay float32
  c.model.patch_size = 4  # vit
  c.model.pooling = "cls"  # vit: cls | mean
  c.model.norm = "rmsnorm"  # lm: rmsnorm | layernorm
  c.model.positions = "rope"  # lm: rope | learned

  mod = c.model.mod = ml_collections.ConfigDict()  # Mixture-of-Depths (models/mod.py)
  mod.every = 0  # routed blocks every-1, 2*every-1, ... (0-based); 0: none (the paper: 2)
  mod.capacity = 0.125  # fraction of each sequence's tokens a routed block processes
  mod.predictor_dim = 0  # hidden width of the causal predictor the LM evaluates by (LM: > 0)

  moe = c.model.moe = ml_collections.ConfigDict()
  moe.router = "switch"  # dense (no MoE layers) | a registered router (routers.names())
  moe.router_module = ""  # a module to import first, which registers a router of your own
  moe.num_experts = 8  # E, per MoE layer
  moe.experts_per_layer = ()  # per-MoE-layer expert counts (PR-MoE pyramid); overrides num_experts
  moe.every = 2  # MoE in layers every-1, 2*every-1, ... (0-based)
  moe.layers = ()  # explicit 0-based MoE layer indices; overrides `every`
  moe.first_dense_layers = 0  # no MoE layer among the first N layers
  moe.first_hash_layers = 0  # the first N MoE layers route by hash (nothing learned)
  moe.expert_hidden_dim = 512  # H, each expert's hidden width
  moe.k = config_dict.placeholder(int)  # None: the router class's default_k (topk 2, switch 1)
  moe.capacity_factor = 1.25  # cf in training: C = max(min_capacity, ceil(k cf S / E))
  moe.eval_capacity_factor = 2.0  # cf in evaluation
  moe.min_capacity = 4  # lower bound on the capacity C
  moe.group_size = config_dict.placeholder(int)  # None: from the einsum cost model (auto)
  moe.dispatch_path = "index"  # index | einsum (same result, slower) | dropless | merge (smear)
  moe.granularity = 1  # DeepSeekMoE: m x experts of 1/m width, m x k chosen (models/common.py)
  moe.num_shared_experts = 0  # always-on experts of the (fine-grained) expert width
  moe.shared_expert_gate = False  # Qwen-MoE: the shared experts scaled by sigmoid(x w_g)
  moe.residual = False  # Residual-MoE: a dense MLP beside the experts (layers.MoeLayer)
  moe.router_init_scale = 0.1  # router kernel std sqrt(scale / M) (Switch: 0.1)
  moe.jitter_eps = 0.0  # input times U(1 - eps, 1 + eps) in training (Switch: 1e-2)
  moe.noise_std = 0.0  # vmoe needs > 0 (the paper: 1 / num_experts)
  moe.batch_prioritized = False  # fill slots by descending top-1 probability (V-MoE)
  moe.router_dtype = "float32"  # float32 | float64: router logits, scores and gate sums
  moe.expert_parallel = "gspmd"  # none | gspmd | shard_map (moe_jax/sharding.py)

  c.mesh = ml_collections.ConfigDict()  # device mesh; sizes multiply to the device count
  c.mesh.data = -1  # -1: all devices left over
  c.mesh.expert = 1  # experts split over this axis (must divide every layer's num_experts)
  c.mesh.model = 1  # expert/FFN hidden dim split over this axis
  c.mesh.rules = sharding.DEFAULT_RULES  # logical axis name -> mesh axis

  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 128  # examples per optimizer step, over all devices and micro-batches
  t.microbatches = 1  # gradient accumulation: the batch in this many micro-batches (train.py)
  t.num_steps = 1000  # optimizer steps
  t.learning_rate = 1e-3  # peak, after linear warmup, then cosine decay
  t.warmup_steps = config_dict.placeholder(int)  # None: a tenth of num_steps (follows the run)
  t.end_learning_rate_fraction = 0.0  # cosine decays to this fraction of the peak
  t.weight_decay = 1e-4  # AdamW, on matrices only
  t.b1 = 0.9  # AdamW beta1
  t.b2 = 0.999  # AdamW beta2
  t.grad_clip_norm = 1.0  # clip the global gradient norm to this
  t.expert_lr_multiplier = 1.0  # scales the learning rate of expert weights
  t.aux_loss_weight = 1e-2  # load-balancing loss per group, summed over MoE layers
  t.seq_aux_loss_weight = 0.0  # load-balancing loss per sequence (DeepSeek-V3's)
  t.global_aux_loss_weight = 0.0  # load-balancing loss over the global batch (Qwen's)
  t.z_loss_weight = 1e-3  # router z-loss, summed over MoE layers
  t.mod_predictor_loss_weight = 1.0  # Mixture-of-Depths predictor's cross-entropy, over blocks
  t.upcycle_from = config_dict.placeholder(str)  # a dense run's workdir: start from its params
  # Routing trace (moe_jax/trace.py): each MoE layer's choices at these steps and every
  # trace_every-th (0: none), in <workdir>/trace/step_<n>.npz; trace_gates adds the gates.
  t.trace_steps = ()
  t.trace_every = 0
  t.trace_gates = False
  t.replay_from = config_dict.placeholder(str)  # a trace or traced run: route by its choices
  t.log_every = 10  # steps per train record in metrics.jsonl (and the last step)
  t.eval_every = 200  # steps per evaluation (and the last step)
  t.eval_max_batches = config_dict.placeholder(int)  # None: the whole eval split
  t.checkpoint_every = 100  # steps per orbax checkpoint (and the last step)
  t.keep_checkpoints = 3  # the newest this many are kept
  # Expert-load monitoring (moe_jax/monitor.py), per MoE layer and train record: an expert under
  # dead_expert_load x the mean load, or one expert over collapse_expert_share of the choices,
  # for monitor_patience records in a row is named in the log and counted in the metrics.
  t.dead_expert_load = 0.1
  t.collapse_expert_share = 0.5
  t.monitor_patience = 3

  # Each registered router's own settings, under its name (model.moe.gshard.
  # second_expert_policy, ...), and the weight of each of its own losses (train.<loss>_weight).
  for name, router_cls in routers.REGISTRY.items():
    if router_cls.settings():
      if name in moe:
        raise ValueError(f"router name {name!r} is a model.moe field; register it as another")
      moe[name] = ml_collections.ConfigDict(router_cls.settings())
  for loss, (field, weight) in routers.loss_weights().items():
    if field in t:
      raise ValueError(f"router loss {loss!r} would be weighted by config.train.{field}, a "
                       "field already; name the loss otherwise")
    t[field] = weight
  return c


ROUTER_MODULE_FLAG = "--config.model.moe.router_module"


def import_router_modules(argv: List[str]) -> None:
  """Imports the module that a --config.model.moe.router_module=M override names, before the
  config file runs: its routers are registered when the file names one (configs/vit.py:<name>),
  and default_config() holds their settings blocks and loss weights for the overrides to set.
  ValueError when it does not import."""
  for i, arg in enumerate(argv):
    if arg.startswith(ROUTER_MODULE_FLAG + "="):
      routers.import_module(arg.split("=", 1)[1])
    elif arg == ROUTER_MODULE_FLAG and i + 1 < len(argv):
      routers.import_module(argv[i + 1])


def import_router_module(config: ml_collections.ConfigDict) -> None:
  """Imports config.model.moe.router_module, and adds to `config` the settings blocks and loss
  weights (with their defaults) of the routers registered since it was built, so that the run
  validates, uses and saves them."""
  routers.import_module(config.model.moe.get("router_module"))
  reference = default_config()
  missing = [("model.moe", name) for name in routers.REGISTRY
             if name in reference.model.moe and name not in config.model.moe]
  missing += [("train", field) for field, _ in routers.loss_weights().values()
              if field not in config.train]
  for path, key in missing:
    block, defaults = config, reference
    for part in path.split("."):
      block, defaults = block[part], defaults[part]
    with block.unlocked():
      block[key] = defaults[key]


# Fields that moved into a router's settings block: the configs of runs written before still load.
MOVED_FIELDS = {"second_expert_policy": ("gshard", "second_expert_policy"),
                "router_scores": ("loss_free", "score_function"),
                "bias_update_rate": ("loss_free", "bias_update_rate")}


def upgrade(config: dict) -> dict:
  """A run's saved config (a dict from its config.json) in today's fields: MOVED_FIELDS move
  from model.moe into their router's block."""
  moe = config["model"]["moe"]
  for old, (router, field) in MOVED_FIELDS.items():
    if old in moe:
      moe.setdefault(router, {})[field] = moe.pop(old)
  return config


def warmup_steps(t: ml_collections.ConfigDict) -> int:
  """The learning-rate warmup of config.train `t`: its warmup_steps, or a tenth of num_steps."""
  return default_warmup_steps(t.num_steps) if t.warmup_steps is None else t.warmup_steps


def default_warmup_steps(num_steps: int) -> int:
  return num_steps // 10


def flag_error(error: BaseException, argv: List[str]) -> Optional[str]:
  """The one line (without "Config error: ") for what parsing --config and its --config.FIELD
  overrides raised; None for absl's own flag errors (an unknown flag, a missing --workdir).

  ml_collections raises while the flags are parsed: OSError for a config file that does not load
  (wrapped once more when overrides are given), flags.Error with the traceback of a config file
  that raised or with the message of a mistyped override, KeyError/AttributeError for an
  override that names no field.
  """
  if isinstance(error, OSError):  # the innermost cause's last line says why
    while error.__cause__ is not None:
      error = error.__cause__
    return str(error).strip().splitlines()[-1].strip()
  text = str(error.args[0] if error.args else error)
  if isinstance(error, flags.Error):
    if text.startswith("flag --config."):  # a mistyped override: "--config.X=v: why"
      return text[len("flag "):]
    if "Traceback" not in text:
      return None
    return error_line(text, 1).split(": ", 1)[-1]  # the exception's line, without its name
  text = " ".join(text.replace("\\'", "'").split())
  name = re.search(r"'(\w+)'", text)
  override = next((arg.split("=")[0] for arg in argv if arg.startswith("--config.") and name
                   and name.group(1) in arg.split("=")[0].split(".")), "an override")
  hint = text[text.find("Did you mean"):].rstrip("'") if "Did you mean" in text else ""
  return f"{override}: no such config field. {hint}".strip()


FLAG_ERRORS = (flags.Error, KeyError, AttributeError, OSError)  # what flag_error explains


def config_argument(argv: List[str]) -> Optional[str]:
  """The value of --config (FILE or FILE:ARG) in these arguments, None without one."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(argv: List[str]) -> None:
  """ConfigError (one line naming the file) for a --config file that ml_collections would load
  with a traceback or misread: a syntax error, an exception while loading or in get_config, no
  get_config, or a result that is not a ConfigDict. Loads it once more than ml_collections does
  (config files are cheap); a missing file is left to flag_error's line."""
  argument = config_argument(argv)
  if argument is None or not os.path.isfile(argument.split(":", 1)[0]):
    return
  path, *arg = argument.split(":", 1)
  try:
    # Under ml_collections' module name: a router class the file registers is then the same.
    config = call_in_file(path, "get_config", arg, fmt="a config file returns its ConfigDict "
                          "from get_config() (see configs/vit_switch.py)", module="config_config")
  except ValueError as error:
    raise ConfigError(str(error)) from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from moe_jax.config.default_config() "
                      "(see configs/vit_switch.py)")


def load_config(argv: List[str]) -> ml_collections.ConfigDict:
  """The config that `experiments.train` would run with these arguments (`--config=FILE[:ARG]`
  and `--config.FIELD=VALUE` overrides; others are ignored), parsed the same way; ConfigError
  with flag_error's line when it cannot be loaded."""
  argv = ["load_config", *(arg for arg in argv if arg.startswith("--config"))]
  try:
    import_router_modules(argv)
  except ValueError as error:
    raise ConfigError(str(error)) from error
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  check_config_file(argv)
  try:
    values(argv)
    config = holder.value
    config.get("model")  # a config file that did not load raises on first use
  except FLAG_ERRORS as error:
    raise ConfigError(flag_error(error, argv[1:]) or str(error)) from error
  return config


def _fail(message: str):
  raise ConfigError(message)


def _check_keys_and_types(config, reference, path: str) -> None:
  for key in config.keys():
    field = f"{path}.{key}"
    if key not in reference:
      _fail(f"{field} is unknown; allowed keys of {path}: {', '.join(sorted(reference.keys()))}")
    value, default = config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(f"{field} must be a config group, got {value!r}")
      _check_keys_and_types(value, default, field)
      continue
    expected = reference.get_type(key) if default is None else type(default)
    if value is None and default is None:
      continue
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
      continue
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
      _fail(f"{field}={value!r} must be of type {expected.__name__}")


INT_TUPLES = ("model.moe.experts_per_layer", "model.moe.layers", "train.trace_steps")


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Unknown keys and wrong types: the first check, so later ones can trust the values."""
  _check_keys_and_types(config, default_config(), "config")
  for path in INT_TUPLES:  # their elements too: the model's checks compare them with ints
    value = config
    for key in path.split("."):
      value = value[key]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      _fail(f"config.{path}={tuple(value)!r} must be a tuple of ints")
  rules = config.mesh.rules
  if not all(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
             and rule[1] in (*sharding.MESH_AXES, None) for rule in rules):
    _fail(f"config.mesh.rules={tuple(rules)!r} must be (logical axis, mesh axis) pairs, each "
          f"mesh axis one of {allowed((*sharding.MESH_AXES, None))}")


def config_path(message: str) -> str:
  """A model or data check's message with its field as the config path ("model.patch_size=5
  ..." -> "config.model.patch_size=5 ...")."""
  message = re.sub(r"^MoeLayer\.", "model.moe.", message)  # a layer the model built
  return re.sub(r"^(model|data|train|mesh)\.", r"config.\1.", message)


def _check_trace_router(config: ml_collections.ConfigDict) -> None:
  """Tracing needs token choices to record, replay a router that can route by them."""
  t, moe = config.train, config.model.moe
  field = "replay_from" if t.replay_from else "trace_steps" if t.trace_steps else (
      "trace_every" if t.trace_every else None)
  if field is None:
    return
  if moe.router == "dense":
    _fail(f"config.train.{field} records or replays MoE routing; config.model.moe.router='dense' "
          "has no MoE layers")
  router_cls = routers.get(moe.router, "config.model.moe")
  if field != "replay_from" and router_cls.form != "choices":
    _fail(f"config.train.{field} records the experts each token chooses; router="
          f"{moe.router!r} routes by {router_cls.form!r}")
  if t.replay_from:
    replaying = [name for name, cls in routers.REGISTRY.items() if cls.replays]
    if not router_cls.replays:
      _fail(f"config.train.replay_from routes by recorded token choices, which router="
            f"{moe.router!r} cannot take; allowed: {allowed(replaying)}")
    if moe.router == "gshard" and moe.gshard.second_expert_policy == "random":
      _fail("config.model.moe.gshard.second_expert_policy='random' cannot be replayed (its gates "
            "are renormalized over 2nd choices it then removes); set 'all' with "
            "config.train.replay_from")


def validate(config: ml_collections.ConfigDict, tokens_per_example: int) -> None:
  """Raises ValueError (one line, naming the field) for a config that cannot run.

  tokens_per_example: tokens one example feeds each MoE layer (patches for the ViT, seq_len for
  the LM); the MoE group size must divide the tokens of a batch.
  """
  import_router_module(config)  # before its settings block
  check_fields(config)
  t = config.train
  for name in ("batch_size", "microbatches", "num_steps", "log_every", "eval_every",
               "checkpoint_every", "keep_checkpoints", "monitor_patience"):
    if t[name] < 1:
      _fail(f"config.train.{name}={t[name]} must be >= 1")
  if t.batch_size % t.microbatches:
    _fail(f"config.train.microbatches={t.microbatches} must divide config.train.batch_size="
          f"{t.batch_size}")
  if t.warmup_steps is not None and not 0 <= t.warmup_steps <= t.num_steps:
    _fail(f"config.train.warmup_steps={t.warmup_steps} must be in [0, num_steps={t.num_steps}] "
          f"or None (a tenth of num_steps: {default_warmup_steps(t.num_steps)})")
  for name in ("learning_rate", "grad_clip_norm", "expert_lr_multiplier"):
    if not t[name] > 0:  # NaN too
      _fail(f"config.train.{name}={t[name]} must be > 0")
  for name in ("b1", "b2"):
    if not 0 <= t[name] < 1:
      _fail(f"config.train.{name}={t[name]} must be in [0, 1) (Adam's decay rates)")
  if not 0 < t.collapse_expert_share <= 1:
    _fail(f"config.train.collapse_expert_share={t.collapse_expert_share} must be in (0, 1]")
  for name in ("aux_loss_weight", "seq_aux_loss_weight", "global_aux_loss_weight",
               "z_loss_weight", "mod_predictor_loss_weight", "weight_decay",
               "end_learning_rate_fraction", "dead_expert_load", "trace_every",
               *(field for field, _ in routers.loss_weights().values())):
    if t[name] < 0:
      _fail(f"config.train.{name}={t[name]} must be >= 0")
  if t.eval_max_batches is not None and t.eval_max_batches < 1:
    _fail(f"config.train.eval_max_batches={t.eval_max_batches} must be >= 1 or None")
  if not 0 <= config.model.dropout < 1:
    _fail(f"config.model.dropout={config.model.dropout} must be in [0, 1)")
  # Checked here, not left to MoeLayer, whose message would name its own field.
  check_choice("config.model", "activation", config.model.activation, ACTIVATIONS)
  if config.model.dtype not in ("float32", "bfloat16"):
    _fail(f"config.model.dtype={config.model.dtype!r} is unknown; allowed: 'float32', "
          "'bfloat16'")

  for step in t.trace_steps:
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= t.num_steps:
      _fail(f"config.train.trace_steps holds {step!r}: steps are ints in [1, num_steps="
            f"{t.num_steps}]")
  _check_trace_router(config)
  moe = config.model.moe
  if moe.router == "dense":
    return
  batch_size = t.batch_size // t.microbatches  # what the layers see
  batch_tokens = batch_size * tokens_per_example
  if moe.group_size is not None and moe.group_size < 1:
    _fail(f"config.model.moe.group_size={moe.group_size} must be >= 1, or None (from the einsum "
          "cost model)")
  if (moe.group_size is not None and moe.group_size < batch_tokens
      and batch_tokens % moe.group_size):
    what = "a batch" if t.microbatches == 1 else f"a micro-batch (1/{t.microbatches})"
    _fail(f"config.model.moe.group_size={moe.group_size} does not divide the {batch_tokens} "
          f"tokens of {what} (batch_size {batch_size} x {tokens_per_example} tokens)")
  layer_fields = {k: v for k, v in moe.items()
                  if k not in ("num_experts", "experts_per_layer", "every", "layers",
                               "first_dense_layers", "first_hash_layers", "expert_hidden_dim",
                               "k", "granularity", "router_module")
                  and not hasattr(v, "keys")}  # the routers' settings blocks
  settings = moe.get(moe.router)
  try:  # MoeLayer validates its own fields and its router's; the messages then name the config
    MoeLayer(**common.fine_grained(moe, moe.num_experts), activation=config.model.activation,
             causal=config.model.name == "lm",
             router_settings=FrozenDict(settings.to_dict() if settings is not None else {}),
             **layer_fields)
  except ValueError as error:
    _fail(re.sub(r"(?<![\w.])(MoeLayer|model\.moe)\.", "config.model.moe.", str(error)))
