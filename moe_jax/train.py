"""The training loop, in parts read top to bottom: check_config derives the run's setup once
(data, layer plan, model, mesh); _train_locked builds the batches (Feed), the sharded state
(state_layout, initial_state) and the compiled steps (make_steps, compile_steps), and the Loop
trains, logs, evaluates and saves.

  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch

What a run writes into its workdir:
  config.json        the resolved config
  metrics.jsonl      one object per logged train step and per evaluation (see `_train_record`)
  tb/                TensorBoard event files with the same scalars
  checkpoints/       orbax: params, router state (loss_free's biases, ...), optimizer state,
                     step, rng and the data iterator position
  final_metrics.json the last train and eval metrics, throughput and FLOP counts, once finished
  trace/             step_<n>.npz: each MoE layer's routing in the steps of train.trace_steps and
                     train.trace_every (moe_jax/trace.py); train.replay_from routes by them
A run restarted with the same workdir resumes from its latest checkpoint and reaches exactly the
metrics an uninterrupted run reaches (on CPU). A non-finite loss stops the run, naming the step,
before anything is saved, so the last checkpoint stays good; a full disk costs only the checkpoint
being written (moe_jax/checkpoints.py: one line with the space the run needs). With
`train.upcycle_from` set, a new run starts from that dense run's parameters (sparse upcycling,
moe_jax/upcycle.py).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Sequence

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import config as config_lib
from moe_jax import data, models, monitor, routers, runlock, sharding, upcycle
from moe_jax import metrics as metrics_lib
from moe_jax import trace as trace_lib

Array = jax.Array
SOWN = ["losses", "routing_sums"]
# The balancing losses the MoE layers sow, and the train config field that weights each: they
# combine (Megatron's list-valued moe_router_load_balancing_type).
BALANCE_LOSSES = {"load_balance_loss": "aux_loss_weight",
                  "seq_balance_loss": "seq_aux_loss_weight",
                  "global_balance_loss": "global_aux_loss_weight"}
# Every weighted loss the layers sow: the balancing losses and Mixture-of-Depths' predictor loss;
# the routers' own losses add theirs (router_losses).
AUX_LOSSES = {**BALANCE_LOSSES, "mod_predictor_loss": "mod_predictor_loss_weight"}
STATE = routers.STATE  # router state updated by each train step (loss_free, ReMoE, StableMoE)
INPUT_KEY = {"image": "image", "text": "inputs"}  # the batch field a model reads, by data kind


def tokens_per_example(model_config, info) -> int:
  """Tokens one example feeds each MoE layer: patches (+ class token) or bytes."""
  if info["kind"] == "text":
    return info["seq_len"]
  height, width = info["image_shape"][:2]
  patches = (height // model_config.patch_size) * (width // model_config.patch_size)
  return patches + (model_config.pooling == "cls")


# ----------------------------------------------------------------------------------------------
# Losses and metrics of one batch.


def first_argmax(x: Array) -> Array:
  """jnp.argmax(x, -1), the first of tied maxima, from two plain reductions: XLA:CPU lowers argmax
  to a variadic reduce that took 2% of the LM's train step (its [B, L, 256] logits)."""
  top = jnp.max(x, -1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), -1)


def model_inputs(batch: Dict[str, Array], kind: str) -> Dict[str, Array]:
  """What the model reads from a batch (models/__init__): its inputs, the padding mask and, from a
  corpus with domain labels, each sequence's domain."""
  return {"mask": batch.get("mask"), **({"domains": batch["domain"]} if "domain" in batch else {})}


def domain_sums(logits: Array, batch: Dict[str, Array], num_domains: int) -> Dict[str, Array]:
  """Per domain d: the summed cross-entropy of its real tokens and their count, [D] each, from
  logits [B,L,V] and a text batch with "domain" [B] (for per-domain bits per byte)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])  # [B,L]
  real = example_weights(batch, "text")
  one_hot = jax.nn.one_hot(batch["domain"], num_domains) * real[:, None]  # [B,D]
  return {"domain_loss_sum": one_hot.T @ losses.sum(axis=1),
          "domain_count": one_hot.sum(axis=0) * losses.shape[1]}


def example_weights(batch: Dict[str, Array], kind: str) -> Array:
  """[B] float32: 1 for a real example, 0 for padding (the batch's mask; none: all real)."""
  labels = batch["label"] if kind == "image" else batch["targets"]
  return batch.get("mask", jnp.ones(labels.shape[:1], bool)).astype(jnp.float32)


def task_loss(logits: Array, batch: Dict[str, Array], kind: str):
  """Mean cross-entropy over real examples (image) or tokens (text), and sums for evaluation.

  logits: [B, classes] or [B, L, V]. batch: label [B] or targets [B, L], optional mask [B].
  Returns (mean loss, {"loss_sum", "correct", "count"}).
  """
  labels = batch["label"] if kind == "image" else batch["targets"]
  weights = example_weights(batch, kind)
  if kind == "text":
    weights = jnp.broadcast_to(weights[:, None], labels.shape)
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (first_argmax(logits) == labels).astype(jnp.float32)
  count = weights.sum()
  sums = {"loss_sum": (losses * weights).sum(), "correct": (correct * weights).sum(),
          "count": count}
  return sums["loss_sum"] / jnp.maximum(count, 1.0), sums


def router_losses(t: ml_collections.ConfigDict) -> Dict[str, str]:
  """{loss name: its weight field of config.train `t`}: AUX_LOSSES and the registered routers'
  own losses (routers.Loss) whose weight the config holds."""
  own = {name: field for name, (field, _) in routers.loss_weights().items() if field in t}
  return {**AUX_LOSSES, **own}


def moe_terms(sown, losses=AUX_LOSSES) -> Dict[str, Any]:
  """Sums the sown MoE losses named in `losses` over layers and collects each layer's routing
  sums (metrics.routing_sums)."""
  flat = flax.traverse_util.flatten_dict(sown.get("losses", {}), sep="/")
  total = lambda name: sum((v[0] for k, v in flat.items() if k.split("/")[-1] == name),
                           jnp.zeros((), jnp.float32))
  sums = flax.traverse_util.flatten_dict(sown.get("routing_sums", {}), sep="/")
  per_layer = {key.rsplit("/", 1)[0]: value[0] for key, value in sums.items()}
  return {**{name: total(name) for name in losses}, "z_loss": total("z_loss"),
          "routing": per_layer}


def initial_variables(model: nn.Module, sample: Array, rng: Array, **inputs):
  """The model's initial variables (boxed) for the seed's key `rng`, from a sample of its inputs
  (and the other inputs it reads: model_inputs).

  Flax derives each parameter's key from `rng` and the parameter's path, so two models that
  share a seed (the members of a sweep at one seed: dense and topk, say) start every parameter
  they have in common (embeddings, attention, norms, dense MLPs, the head) from the same values:
  their difference comes from routing alone (common random numbers, tests/test_train.py).
  """
  return model.init({"params": rng, "dropout": rng, "routing": rng}, sample, deterministic=True,
                    **inputs)


# ----------------------------------------------------------------------------------------------
# Optimizer: AdamW with warmup + cosine decay, global-norm clipping, and a learning-rate
# multiplier for expert weights (optax.multi_transform over parameter labels).


def learning_rate_schedule(t: ml_collections.ConfigDict, scale: float = 1.0):
  peak = t.learning_rate * scale
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=config_lib.warmup_steps(t),
      decay_steps=t.num_steps, end_value=peak * t.end_learning_rate_fraction)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  def adamw(scale):
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.adamw(learning_rate_schedule(t, scale), b1=t.b1, b2=t.b2,
                       weight_decay=t.weight_decay, mask=decay_mask)

  def labels(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {path: "experts" if "experts" in path else "default" for path in flat})

  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.multi_transform({"default": adamw(1.0), "experts": adamw(t.expert_lr_multiplier)},
                            labels))


def eval_record(totals: Dict[str, Any], kind: str, domains: Sequence[str]) -> Dict[str, float]:
  """The evaluation record from eval_step's sums over the batches: loss and accuracy, for text
  bits per byte, and with domain labels each domain's bits per byte and their unweighted mean
  (eval/bits_per_byte_macro; eval/bits_per_byte weighs every byte alike)."""
  loss = float(totals["loss_sum"]) / max(float(totals["count"]), 1.0)
  result = {"eval/loss": loss,
            "eval/accuracy": float(totals["correct"]) / max(float(totals["count"]), 1.0)}
  if kind == "text":
    result["eval/bits_per_byte"] = loss / math.log(2)
  if domains:
    per_domain = totals["domain_loss_sum"] / np.maximum(totals["domain_count"], 1.0) / math.log(2)
    result |= {f"eval/bits_per_byte/{name}": float(bpb) for name, bpb in zip(domains, per_domain)}
    result["eval/bits_per_byte_macro"] = float(np.mean(per_domain))
  return result


def make_steps(model, optimizer, t: ml_collections.ConfigDict, kind: str, num_domains: int = 0):
  """The pure train and eval steps (the caller jits them with its shardings).

  train_step(state, batch, replay=None, trace=False) -> (state, metrics); eval_step(params,
  router_state, batch) -> loss/accuracy sums (and each of num_domains domains' loss and token
  count, for data with domain labels). With trace=True (static) metrics['trace'] holds
  every MoE layer's decisions of the step's own forward pass ('<layer>/choices', '/kept' and,
  with t.trace_gates, '/gates', [G,S,K] each: moe_jax/trace.py); replay {layer: [G,S,K]}
  choices (a trace's) replace the routers' choices of the tokens-choose routers.

  Loss = task loss + aux_loss_weight * load-balance (per group) +
  seq_aux_loss_weight * per-sequence load-balance + global_aux_loss_weight * global-batch
  load-balance + z_loss_weight * z-loss (each summed over layers) + mod_predictor_loss_weight *
  Mixture-of-Depths predictor loss (summed over routed blocks) + each router loss's
  train.<name>_weight * that loss (router_losses). The router state is not differentiated: the
  forward pass of a train step returns it updated (routers.Router.update_state), and the step
  stores it for the next one.

  Gradient accumulation (t.microbatches = n > 1): micro-batch i holds the examples i, i + n,
  i + 2n, ... (each micro-batch spread over every batch shard), a scan adds their gradients (the
  activations of one micro-batch in memory) and the optimizer steps once. Equal to the single
  batch, to float32 rounding: the task loss and accuracy (sums over the batch's labels), the
  z-loss and the sequence-wise loss (means over real tokens and sequences: each micro-batch weighs
  by its share of the real examples), the global-batch loss (its counts f are the whole batch's: a
  first forward pass over the micro-batches sums them, routers.batch_total), the loss_free biases
  and ReMoE's lambda (from the whole batch's load and sparsity, by the same counts) and the
  routing statistics (from routing sums added over micro-batches), so the same parameters result.
  The per-group load-balance loss is per micro-batch by definition, as Megatron's per-micro-batch
  aux loss: equal only when no group spans examples of two micro-batches (a group size that
  divides the tokens of one example). Random draws (dropout, jitter, GShard's 2nd expert) differ:
  each micro-batch draws its own. The first pass costs one more forward per micro-batch; it runs
  only when the counts change the step (global_aux_loss_weight > 0, or a router that calls
  batch_total: loss_free, ReMoE); without it the logged global_balance_loss is the micro-batches'
  mean.
  Besides each layer's statistics of the whole batch (max_violation: MaxVio of the global
  batch), micro_batch_max_violation is the mean over micro-batches of each one's MaxVio.
  """
  steps = Steps(model, optimizer, t, kind, num_domains)
  return steps.train_step, steps.eval_step


def split_microbatches(batch: Dict[str, Array], n: int) -> Dict[str, Array]:
  """[B, ...] -> [n, B / n, ...]: micro-batch i holds examples i, i + n, ..."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, n, *x.shape[1:]), 0, 1), batch)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as jit needs
class Steps:
  """make_steps' steps in parts: the forward pass (apply), the loss of one micro-batch
  (micro_loss), the counting pass over the micro-batches (batch_counts), the train step and its
  metrics (step_metrics), the eval step."""
  model: nn.Module
  optimizer: optax.GradientTransformation
  t: ml_collections.ConfigDict
  kind: str
  num_domains: int = 0

  @functools.cached_property
  def losses(self) -> Dict[str, str]:
    return router_losses(self.t)

  def apply(self, params, router_state, batch, rng, train, mutable, counts=None, replay=None):
    dropout_rng, routing_rng = jax.random.split(rng)
    variables = {"params": params, STATE: router_state}
    if counts is not None:
      variables[routers.COUNTS] = counts
    if replay is not None:
      variables[routers.REPLAY] = replay
    # The mask (evaluation's padded last batch) keeps padding out of routing and its statistics.
    return self.model.apply(variables, batch[INPUT_KEY[self.kind]],
                            **model_inputs(batch, self.kind), deterministic=not train,
                            rngs={"dropout": dropout_rng, "routing": routing_rng},
                            mutable=mutable)

  def weighted(self, terms):
    """The loss: the task loss plus the MoE losses, each under its weight."""
    t = self.t
    return terms["task_loss"] + t.z_loss_weight * terms["z_loss"] + sum(
        t[weight] * terms[name] for name, weight in self.losses.items())

  def micro_loss(self, params, router_state, counts, batch, rng, replay, share, label_count,
                 trace):
    """The step's loss restricted to this micro-batch: the micro-batches' losses sum to the
    batch's. share: its fraction of the batch's real examples; label_count: the batch's."""
    logits, sown = self.apply(params, router_state, batch, rng, True,
                              SOWN + [STATE] + ([routers.TRACE] if trace else []), counts, replay)
    _, sums = task_loss(logits, batch, self.kind)
    moe = moe_terms(sown, self.losses)
    terms = {"task_loss": sums["loss_sum"] / jnp.maximum(label_count, 1.0),
             "z_loss": share * moe["z_loss"],
             **{name: share * moe[name] for name in self.losses}}
    if counts is not None:  # already this micro-batch's part of the batch's loss
      terms["global_balance_loss"] = moe["global_balance_loss"]
    return self.weighted(terms), (terms, sums["correct"], moe["routing"],
                                  sown.get(STATE, router_state), sown.get(routers.TRACE, {}))

  def batch_counts(self, params, router_state, micro, rngs, replay):
    """The whole batch's counts (routers.batch_total) from a forward pass over the micro-batches,
    or None where nothing reads one."""
    if self.t.microbatches == 1:
      return None
    # STATE mutable too: update_state's counts (its update is the training pass's).
    count = lambda xs: self.apply(params, router_state, xs[0], xs[1], True,
                                  [routers.COUNTS, STATE], replay=xs[2])[1].get(routers.COUNTS, {})
    count_all = lambda: jax.lax.map(count, (micro, rngs, replay))
    # The extra forward pass only where a count is read: the layers' global-batch loss
    # under its weight, a router's (loss_free's load, ReMoE's sparsity) always.
    if any(self.t.global_aux_loss_weight > 0 or "router" in path for path
           in flax.traverse_util.flatten_dict(jax.eval_shape(count_all))):
      return jax.tree.map(lambda c: c.sum(axis=0), count_all())
    return None

  def train_step(self, state, batch, replay=None, trace=False):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    n = self.t.microbatches
    micro = split_microbatches(batch, n)
    rngs = rng[None] if n == 1 else jax.random.split(rng, n)
    examples = example_weights(batch, self.kind).reshape(-1, n).sum(axis=0)  # [n] real examples
    shares = examples / jnp.maximum(examples.sum(), 1.0)
    label_count = examples.sum() * (
        batch["targets"].shape[1] if self.kind == "text" else 1)
    params, router_state = state["params"], state[STATE]
    if replay is not None:  # [G,S,K] -> [n, G / n, S, K] where each layer's router reads them
      replay = flax.traverse_util.unflatten_dict(
          {(*layer.split("/"), "router", "choices"): c.reshape(n, -1, *c.shape[1:])
           for layer, c in replay.items()})
    counts = self.batch_counts(params, router_state, micro, rngs, replay)

    def accumulate(grads, xs):
      (_, aux), micro_grads = jax.value_and_grad(self.micro_loss, has_aux=True)(
          params, router_state, counts, *xs, label_count, trace)
      return jax.tree.map(jnp.add, grads, micro_grads), aux

    # Unrolled for one micro-batch: no loop, the step of the whole batch.
    grads, (terms, correct, sums, new_state, traced) = jax.lax.scan(
        accumulate, jax.tree.map(jnp.zeros_like, params), (micro, rngs, replay, shares),
        unroll=n == 1)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
    metrics = self.step_metrics(terms, correct, sums, grads, label_count, traced, trace)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 STATE: jax.tree.map(lambda b: b[-1], new_state),  # the last micro-batch's update
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  def step_metrics(self, terms, correct, sums, grads, label_count, traced, trace):
    """The step's metrics from its micro-batches' terms, correct counts and routing sums [n, ...]
    (each layer's statistics of the whole batch, and the mean of the micro-batches' MaxVio), and
    with trace their recorded decisions, [n, G / n, S, K] -> [G, S, K] (micro-batch 0's groups
    first)."""
    terms = {name: value.sum() for name, value in terms.items()}
    routing = {}
    for layer, layer_sums in sums.items():
      routing[layer] = {**metrics_lib.statistics(metrics_lib.total_sums(layer_sums)),
                        "micro_batch_max_violation": jnp.mean(
                            jax.vmap(metrics_lib.statistics)(layer_sums)["max_violation"])}
    metrics = {"loss": self.weighted(terms), **terms, "accuracy": correct.sum() / label_count,
               "grad_norm": optax.global_norm(grads), "routing": routing}
    if trace:
      metrics["trace"] = {key: value.reshape(-1, *value.shape[2:]) for key, value
                          in flax.traverse_util.flatten_dict(traced, sep="/").items()
                          if self.t.trace_gates or not key.endswith("/gates")}
    return metrics

  def eval_step(self, params, router_state, batch):
    logits = self.apply(params, router_state, batch, jax.random.key(0), False, False)
    sums = task_loss(logits, batch, self.kind)[1]
    if self.num_domains:
      sums |= domain_sums(logits, batch, self.num_domains)
    return sums


# ----------------------------------------------------------------------------------------------
# Metric records (metrics.jsonl, TensorBoard, terminal).


class MetricWriter:
  """Appends records to metrics.jsonl and scalars to TensorBoard (process 0 only).

  On resume, records after the restored step are removed: those steps run again.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, record: Dict[str, Any]) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)) and key != "step":
        self.tb.add_scalar(key, value, record["step"])
    self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()


class Interval:
  """The wall-clock and CPU time of the train steps since the last `measure`, paused while the
  loop logs, evaluates and saves, so throughput counts train steps alone.

  Other work on the machine slows a run without any fault of its router; the process's CPU share
  says when that happened, so a slow interval can be told from a slow model.
  """

  def __init__(self):
    # The cores this process may run on: its affinity (taskset, a container's cpuset), if any.
    self.cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count())
    self.seconds = self.cpu = 0.0
    self.resume()

  def resume(self) -> None:
    self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

  def pause(self) -> None:
    self.seconds += time.perf_counter() - self.wall_start
    self.cpu += time.process_time() - self.cpu_start

  def measure(self) -> Dict[str, float]:
    """Called paused; starts the next interval. {seconds: wall-clock seconds of train steps;
    cpu_share: this process's CPU seconds (every thread, user + system) in them over seconds x
    cores (1: every core it may use busy with it all along); load_avg: the machine's 1-minute
    load average (runnable processes)}."""
    measured = {"seconds": self.seconds, "cpu_share": self.cpu / (self.seconds * self.cores),
                "load_avg": os.getloadavg()[0]}
    self.seconds = self.cpu = 0.0
    return measured


def _train_record(step, history, interval, tokens_per_step, lr) -> Dict[str, Any]:
  """Means over the steps since the last record: losses, throughput, routing per MoE layer.

  interval: Interval.measure() over those steps (seconds, cpu_share, load_avg, kept as they are).
  """
  mean = lambda values: np.mean(np.stack(values), axis=0)
  flat = [flax.traverse_util.flatten_dict(h, sep="/") for h in history]
  seconds = interval["seconds"]
  record = {"step": step, "lr": lr, "steps_per_s": len(history) / seconds,
            "tokens_per_s": len(history) * tokens_per_step / seconds, **interval}
  for key in flat[0]:
    value = mean([f[key] for f in flat])
    record[f"train/{key}"] = value.tolist() if value.ndim else float(value)
  return record


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What check_config derives once from a run's config: the data's description
  (data.dataset_info), the model's layer plan (models.layer_plan), the model and the mesh."""
  info: Dict[str, Any]
  plan: models.common.LayerPlan
  model: nn.Module
  mesh: jax.sharding.Mesh


def check_config(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Everything that can be wrong with a run's config and workdir, before anything compiles or
  is written: ConfigError (one line, naming the field)."""
  try:
    check_workdir(workdir)
    data_dir = config.data.get("data_dir")
    if isinstance(data_dir, str) and os.path.isfile(data_dir):  # TFDS would mkdir it: a traceback
      raise config_lib.ConfigError(f"config.data.data_dir={data_dir!r} is a file, not a "
                                   "directory")
    info = data.dataset_info(config.data)
    config_lib.check_fields(config)
    models.check_config(config.model, info)  # the patch size before the group size it implies
    per_example = tokens_per_example(config.model, info)
    config_lib.validate(config, per_example)
    plan = models.layer_plan(config.model, info)
    model = models.get_model(config.model, info, plan)
    upcycle.check_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    batch_tokens = config.train.batch_size // config.train.microbatches * per_example
    moe_groups = [(layer.resolved_group_size(batch_tokens), layer.num_experts)
                  for layer in plan.moe_layers().values()]
    sharding.check_divisibility(config, per_example, jax.device_count(), moe_groups)
    if config.train.replay_from:  # the steps after the latest checkpoint, if it restores
      trace_lib.check_replay(config.train.replay_from,
                             range((upcycle.latest_step(workdir) or 0) + 1,
                                   config.train.num_steps + 1),
                             trace_lib.expected_choices(config, per_example, plan.moe_layers()),
                             config.train.microbatches)
  except (ValueError, FileNotFoundError) as error:
    raise config_lib.ConfigError(config_lib.config_path(str(error))) from error
  return RunSetup(info, plan, model, mesh)


def check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is a writable directory or can be created as one (creates
  nothing)."""
  if not workdir or workdir.startswith("-"):  # "--workdir --config.seed=1" takes the flag
    raise config_lib.ConfigError(f"--workdir={workdir!r} is not a directory name: give the run's "
                                 "directory, --workdir=DIR")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, not a directory")
  if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"--workdir={workdir} is not writable: give write permission "
                                 "or another --workdir")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f"--workdir={workdir} cannot be created: {parent} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"--workdir={workdir} cannot be created: {parent} is not "
                                 "writable")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  setup = check_config(config, workdir)
  with jax.set_mesh(setup.mesh):
    return _train(config, workdir, setup)


def _train(config, workdir, setup: RunSetup) -> Dict[str, Any]:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise config_lib.ConfigError(f"--workdir={workdir} cannot be created: {error}") from error
  # One writer per run: a second process on this workdir stops here, before it writes anything.
  lock = runlock.acquire(workdir) if jax.process_index() == 0 else None
  try:
    # From here a first Ctrl-C or SIGTERM only asks the loop to stop before its next step: a
    # KeyboardInterrupt raised during the setup could land in a garbage-collection callback,
    # which Python reports and swallows, and the run went on training without its runner.
    with runlock.deferred_interrupts():
      return _train_locked(config, workdir, setup)
  finally:
    if lock is not None:
      lock.close()


def _train_locked(config, workdir, setup: RunSetup) -> Dict[str, Any]:
  t = config.train
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  flops = models.flop_counts(config.model, setup.info, setup.plan)
  feed = Feed.create(config, setup.info, setup.mesh)
  optimizer = make_optimizer(t)
  layout = state_layout(config, setup, optimizer, feed)
  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True))
  state = initial_state(config, workdir, layout, checkpoints, feed.train_iter)
  start_step = int(state["step"])
  loop = Loop(config, workdir, setup, feed, compile_steps(setup, optimizer, t, layout, feed),
              checkpoints, start_step)
  if start_step == 0:
    loop.writer.write({"step": 0, **{f"model/{k}": v for k, v in flops.items()}})
  print("Model: " + ", ".join(f"{k} {v:,.0f}" for k, v in flops.items()), flush=True)
  loop.run_to_end(state, start_step, layout)

  final_path = os.path.join(workdir, "final_metrics.json")
  if start_step == t.num_steps and os.path.exists(final_path):  # finished before: report it
    with open(final_path) as f:
      return json.load(f)
  # The routers' own statistics and their directions, for the sweep's columns and comparisons.
  statistics = routers.statistic_directions(
      dict.fromkeys(layer.router for layer in setup.plan.moe_layers().values()))
  final = {"status": "finished", "step": t.num_steps, "train": loop.last_train,
           "eval": loop.last_eval, "model": flops, "router_statistics": statistics}
  if jax.process_index() == 0:
    with open(final_path, "w") as f:
      json.dump(final, f, indent=2)
  return final


@dataclasses.dataclass(frozen=True)
class Feed:
  """The run's batches. Each process reads its own slice of every global batch (`loader`: data.
  make_loader for this process's shard); `to_global` makes the slices one array split over the
  (data, expert) mesh axes. The train stream's position is checkpointed with the state."""
  loader: Callable[..., Any]
  train_iter: Any
  sharding: NamedSharding

  @classmethod
  def create(cls, config, info, mesh) -> Feed:
    loader = functools.partial(data.make_loader, config.data,
                               batch_size=config.train.batch_size // jax.process_count(),
                               shard_index=jax.process_index(), shard_count=jax.process_count())
    return cls(loader, loader(info["train_split"], seed=config.seed, shuffle=True),
               sharding.batch_sharding(mesh))

  def to_global(self, batch: Dict[str, np.ndarray]) -> Dict[str, Array]:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharding, x), batch)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """The train state: params, router state ({} without routers that keep one), optimizer state,
  completed steps, base rng (per-step keys fold in the step, so a resumed run draws the same
  randomness). init(rng, dense_params=None), jitted, creates it already sharded by `shardings`:
  params by their logical axes, optimizer moments like their params, the rest replicated;
  `abstract`: its shapes, dtypes and shardings, which a restore fills."""
  init: Callable[..., Dict[str, Any]]
  shardings: Dict[str, Any]
  abstract: Dict[str, Any]

  @property
  def replicated(self) -> NamedSharding:
    return self.shardings["step"]


def state_layout(config, setup: RunSetup, optimizer, feed: Feed) -> StateLayout:
  kind = setup.info["kind"]
  sample = next(feed.loader(setup.info["train_split"], seed=0, shuffle=False))
  init_variables = functools.partial(initial_variables, setup.model, sample[INPUT_KEY[kind]],
                                     **model_inputs(sample, kind))
  boxed_variables = jax.eval_shape(init_variables, jax.random.key(config.seed))
  param_shardings = sharding.logical_shardings(boxed_variables["params"], setup.mesh,
                                               config.mesh.rules)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed_variables["params"]))
  shardings = {"step": replicated, "params": param_shardings, "rng": replicated,
               STATE: jax.tree.map(lambda _: replicated, boxed_variables.get(STATE, {})),
               "opt_state": sharding.like_params(abstract_opt_state, param_shardings, replicated)}

  @functools.partial(jax.jit, out_shardings=shardings)
  def init(rng, dense_params=None):
    variables = nn.meta.unbox(init_variables(rng))
    params = variables["params"]
    if dense_params is not None:
      params = upcycle.upcycle_params(params, dense_params, config.model.moe.granularity)
    return {"step": jnp.zeros((), jnp.int32), "params": params, STATE: variables.get(STATE, {}),
            "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed))}

  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init, jax.random.key(config.seed)), shardings)
  return StateLayout(init, shardings, abstract)


def initial_state(config, workdir: str, layout: StateLayout, checkpoints: ocp.CheckpointManager,
                  train_iter) -> Dict[str, Any]:
  """The newest readable checkpoint's state (restored into this mesh, whatever saved it, with the
  data stream's position), else a new run's: upcycled from train.upcycle_from's dense run when
  set (a resumed run keeps its own params), else initialized from the seed."""
  t = config.train
  restored = checkpoints_lib.restore_newest_readable(
      checkpoints, workdir, lambda step: ocp.args.Composite(
          state=ocp.args.StandardRestore(
              checkpoints_lib.stored_state_names(layout.abstract, checkpoints, step)),
          data=grain.checkpoint.CheckpointRestore(train_iter)))
  if restored is not None:
    state = routers.renamed_state(restored["state"])
    print(f"Resumed from step {int(state['step'])} of {workdir}", flush=True)
    return state
  if not t.upcycle_from:
    return layout.init(jax.random.key(config.seed))
  try:
    dense_params = upcycle.load_dense_params(t.upcycle_from)
  except Exception as error:  # orbax and tensorstore raise many types for damaged files
    raise config_lib.ConfigError(
        f"config.train.upcycle_from={t.upcycle_from!r}: its latest checkpoint does not "
        f"restore ({checkpoints_lib.reason_of(error)})") from error
  state = layout.init(jax.random.key(config.seed), dense_params)
  print(f"Upcycled from the dense run {t.upcycle_from}", flush=True)
  return state


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """make_steps' steps jitted with the state's and the batches' shardings: `train` by whether
  the step is traced (a traced step runs its own compiled variant, so the others run exactly as
  without a trace), `eval`."""
  train: Dict[bool, Callable[..., Any]]
  eval: Callable[..., Any]


def compile_steps(setup: RunSetup, optimizer, t, layout: StateLayout,
                  feed: Feed) -> CompiledSteps:
  train_step, eval_step = make_steps(setup.model, optimizer, t, setup.info["kind"],
                                     len(setup.info.get("domains", ())))
  replay_shardings = (layout.replicated,) if t.replay_from else ()
  return CompiledSteps(
      train={traced: jax.jit(functools.partial(train_step, trace=traced),
                             in_shardings=(layout.shardings, feed.sharding, *replay_shardings),
                             out_shardings=(layout.shardings, layout.replicated),
                             donate_argnums=0)
             for traced in (False, True)},
      eval=jax.jit(eval_step, in_shardings=(layout.shardings["params"], layout.shardings[STATE],
                                            feed.sharding),
                   out_shardings=layout.replicated))


class Loop:
  """Steps start_step + 1 .. train.num_steps of a run: each trains on the next batch (`step`); at
  their intervals the loop logs a train record, evaluates and saves. Throughput counts the train
  steps alone: the Interval pauses for everything else."""

  def __init__(self, config, workdir: str, setup: RunSetup, feed: Feed, steps: CompiledSteps,
               checkpoints: ocp.CheckpointManager, start_step: int):
    self.t, self.workdir, self.info = config.train, workdir, setup.info
    self.feed, self.steps, self.checkpoints = feed, steps, checkpoints
    per_example = tokens_per_example(config.model, setup.info)
    self.tokens_per_step = self.t.batch_size * per_example
    self.expected_choices = trace_lib.expected_choices(config, per_example,
                                                       setup.plan.moe_layers())
    if self.t.replay_from:  # again: the restore may have fallen back to an older checkpoint
      trace_lib.check_replay(self.t.replay_from, range(start_step + 1, self.t.num_steps + 1),
                             self.expected_choices, self.t.microbatches)
    self.writer = MetricWriter(workdir, start_step)
    self.progress = tqdm.tqdm(total=self.t.num_steps, initial=start_step,
                              disable=not sys.stderr.isatty(),
                              desc=os.path.basename(os.path.normpath(workdir)), unit="step")
    self.history, self.last_train, self.last_eval = [], {}, {}
    self.interval = Interval()
    self.load_monitor = monitor.LoadMonitor(self.t.dead_expert_load, self.t.collapse_expert_share,
                                            self.t.monitor_patience)

  def run_to_end(self, state, start_step: int, layout: StateLayout) -> None:
    """The steps; then, however they end, every pending save completes and the writers close. A
    full disk, whichever write met it (most often an asynchronous save), is raised as one
    DiskFull line once orbax's threads are done with the partial checkpoint."""
    full = None
    try:
      self.run(state, start_step)
    except Exception as error:
      if not checkpoints_lib.is_disk_full(error):
        raise
      full = error
    finally:
      try:
        self.checkpoints.wait_until_finished()  # a pending save completes even when the run fails
      except Exception as error:
        if not checkpoints_lib.is_disk_full(error):
          raise
        full = error
      self.checkpoints.close()
      self.progress.close()
      self.writer.close()
    if full is not None:
      state_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                        for leaf in jax.tree.leaves(layout.abstract))
      raise checkpoints_lib.disk_full(os.fspath(self.checkpoints.directory), self.workdir,
                                      self.t.keep_checkpoints, state_bytes) from None

  def run(self, state, start_step: int) -> None:
    t = self.t
    for step in range(start_step + 1, t.num_steps + 1):
      if runlock.stop_requested():  # a Ctrl-C or SIGTERM during the last step: stop here
        raise KeyboardInterrupt
      state = self.step(state, step)
      logs, evaluates, saves = (step % every == 0 or step == t.num_steps for every in
                                (t.log_every, t.eval_every, t.checkpoint_every))
      if not (logs or evaluates or saves):
        continue
      self.interval.pause()  # throughput excludes logging, evaluation and checkpoints
      if logs:
        self.log(step)
      if evaluates:
        self.last_eval = {"step": step, **self.evaluate(state)}
        self.writer.write(self.last_eval)
        print(f"step {step:>6}  " + "  ".join(
            f"{k} {v:.4f}" for k, v in self.last_eval.items() if k != "step"), flush=True)
      if saves:
        self.checkpoints.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(self.feed.train_iter)))
      self.interval.resume()

  def step(self, state, step: int):
    """One train step on the next batch (traced or replayed as train.trace_* and replay_from
    say); a non-finite loss stops the run before anything after it is saved."""
    t = self.t
    replay = (trace_lib.load_replay(t.replay_from, step, self.expected_choices, t.microbatches),
              ) if t.replay_from else ()
    state, metrics = self.steps.train[trace_lib.is_traced(t, step)](
        state, self.feed.to_global(next(self.feed.train_iter)), *replay)
    metrics = jax.device_get(metrics)
    recorded = metrics.pop("trace", None)
    if not np.isfinite(metrics["loss"]):
      last = self.checkpoints.latest_step()
      raise FloatingPointError(
          f"loss is {metrics['loss']} at step {step}; run stopped, nothing saved after it "
          + (f"(last checkpoint: step {last})" if last is not None
             else "(no checkpoint yet: a rerun starts from step 0)"))
    if recorded is not None and jax.process_index() == 0:
      self.interval.pause()  # throughput counts the step, not the writing
      trace_lib.write(self.workdir, step, recorded, t.microbatches)
      self.interval.resume()
    self.history.append(metrics)
    self.progress.update(1)
    return state

  def log(self, step: int) -> None:
    """The train record of the steps since the last one, with the load monitor's warnings."""
    record = _train_record(step, self.history, self.interval.measure(), self.tokens_per_step,
                           float(learning_rate_schedule(self.t)(step - 1)))
    load_metrics, warnings = self.load_monitor.update(record)
    record.update(load_metrics)
    for warning in warnings:
      print(f"step {step:>6}  warning: {warning}", flush=True)
    self.writer.write(record)
    self.progress.set_postfix(loss=f"{record['train/loss']:.4f}",
                              tok_s=f"{record['tokens_per_s']:.0f}")
    if self.progress.disable:
      print(f"step {step:>6}  loss {record['train/loss']:.4f}  "
            f"tokens/s {record['tokens_per_s']:.0f}", flush=True)
    self.last_train, self.history = record, []

  def evaluate(self, state) -> Dict[str, float]:
    """eval_record of the eval split's loss sums (its first train.eval_max_batches batches when
    set)."""
    batches = self.feed.loader(self.info["eval_split"], seed=0, shuffle=False, num_epochs=1,
                               drop_remainder=False)
    totals = {}
    for batch in itertools.islice(batches, self.t.eval_max_batches):
      sums = self.steps.eval(state["params"], state[STATE], self.feed.to_global(batch))
      for key, value in jax.device_get(sums).items():
        totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return eval_record(totals, self.info["kind"], self.info.get("domains", ()))
