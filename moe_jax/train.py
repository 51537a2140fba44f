"""The training loop: one function, read top to bottom.

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
being written (DiskFull: one line with the space the run needs). With `train.upcycle_from` set, a
new run starts from that dense run's parameters (sparse upcycling, moe_jax/upcycle.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from typing import Any, Dict, Sequence

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio
import tqdm
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter

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


def check_config(config: ml_collections.ConfigDict, workdir: str):
  """Everything that can be wrong with a run's config and workdir, before anything compiles or
  is written: ConfigError (one line, naming the field). Returns (data info, model, mesh)."""
  try:
    check_workdir(workdir)
    data_dir = config.data.get("data_dir")
    if isinstance(data_dir, str) and os.path.isfile(data_dir):  # TFDS would mkdir it: a traceback
      raise config_lib.ConfigError(f"config.data.data_dir={data_dir!r} is a file, not a "
                                   "directory")
    info = data.dataset_info(config.data)
    config_lib.check_fields(config)
    models.check_config(config.model, info)  # the patch size before the group size it implies
    config_lib.validate(config, tokens_per_example(config.model, info))
    model = models.get_model(config.model, info)
    upcycle.check_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    per_example = tokens_per_example(config.model, info)
    batch_tokens = config.train.batch_size // config.train.microbatches * per_example
    moe_groups = [(layer.resolved_group_size(batch_tokens), layer.num_experts)
                  for layer in models.moe_layers(config.model)]
    sharding.check_divisibility(config, per_example, jax.device_count(), moe_groups)
    if config.train.replay_from:  # the steps after the latest checkpoint, if it restores
      trace_lib.check_replay(config.train.replay_from,
                             range((upcycle.latest_step(workdir) or 0) + 1,
                                   config.train.num_steps + 1),
                             trace_lib.expected_choices(config, per_example),
                             config.train.microbatches)
  except (ValueError, FileNotFoundError) as error:
    raise config_lib.ConfigError(config_lib.config_path(str(error))) from error
  return info, model, mesh


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


class NoReadableCheckpoint(RuntimeError):
  """Every checkpoint of a run failed to restore (each was moved aside); the message says so."""


UNREADABLE = "checkpoints_unreadable"  # where unreadable checkpoints go, beside checkpoints/


def _reason(error: BaseException) -> str:
  """Why a restore failed, in one line: tensorstore's status line when a cause has one
  ("OUT_OF_RANGE: Error reading ..."; orbax's wrapper prints the whole array spec), else the
  error's own first line."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  firsts = [next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            for e in chain]
  status = [line for line in firsts if re.match(r"^[A-Z_]{4,}: ", line)]
  return (status or firsts)[0] or type(error).__name__


def stored_state_names(abstract_state: Dict[str, Any], checkpoints: ocp.CheckpointManager,
                       step: int) -> Dict[str, Any]:
  """abstract_state as checkpoint `step` names its entries: the router state under
  routers.LEGACY_STATE in a checkpoint written before the rename (routers.renamed_state undoes
  it after the restore)."""
  handler = ocp.PyTreeCheckpointHandler()  # the item's own: its metadata, nothing restored
  try:
    stored = handler.metadata(epath.Path(os.fspath(checkpoints.directory)) / str(step) / "state")
  except FileNotFoundError:  # a damaged checkpoint: the restore says why
    return abstract_state
  finally:
    handler.close()
  if routers.LEGACY_STATE not in stored.tree:
    return abstract_state
  return {routers.LEGACY_STATE if key == STATE else key: value
          for key, value in abstract_state.items()}


def restore_newest_readable(checkpoints: ocp.CheckpointManager, workdir: str, args_of_step):
  """The newest checkpoint that restores (None when there is none at all); args_of_step(step):
  its restore args.

  A checkpoint that fails to restore (a truncated or missing file, lost metadata) costs only
  itself: one line says which step and why, the step moves to <workdir>/checkpoints_unreadable/
  (nothing is deleted) and the next older one is tried. Raises NoReadableCheckpoint when every
  checkpoint failed.
  """
  unreadable = []
  while (step := checkpoints.latest_step()) is not None:
    try:
      return checkpoints.restore(step, args=args_of_step(step))
    except Exception as error:  # orbax and tensorstore raise many types for damaged files
      reason = _reason(error)
    aside = os.path.join(workdir, UNREADABLE, str(step))
    while os.path.exists(aside):  # an earlier unreadable copy of the same step stays
      aside += "+"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(os.fspath(checkpoints.directory), str(step)), aside)
    sync_global_devices(f"unreadable checkpoint {step}")
    checkpoints.reload()
    unreadable.append(step)
    print(f"Checkpoint step {step} is unreadable ({reason}); moved to {aside}", flush=True)
  if unreadable:
    raise NoReadableCheckpoint(
        f"no checkpoint of {workdir} is readable: steps {', '.join(map(str, unreadable))} "
        f"moved to {os.path.join(workdir, UNREADABLE)}; running again starts from step 0")
  return None


class DiskFull(RuntimeError):
  """The disk filled up while the run wrote (a checkpoint, most often); the message says how much
  space the run needs and where. The partial checkpoint is removed, the complete ones kept."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` or a cause of it is "no space left on device" (Python's OSError ENOSPC, or
  tensorstore's RESOURCE_EXHAUSTED with the OS error in its text)."""
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _megabytes(size: float) -> str:
  return f"{size / 2**20:.1f} MB"


def disk_full(directory: str, workdir: str, keep: int, state_bytes: int) -> DiskFull:
  """The DiskFull of a run whose disk filled up, its checkpoint manager closed: removes the
  partial checkpoints orbax left in `directory` (<step>.orbax-checkpoint-tmp*, which a rerun does
  not resume from) and says how much space the run needs: keep + 1 checkpoints (a new one is
  written before the oldest is deleted) of the size of the newest complete one (before the first,
  the train state's bytes)."""
  partial = sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
  if jax.process_index() == 0:
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  last = max(steps, default=None)
  size = state_bytes if last is None else sum(
      os.lstat(os.path.join(root, name)).st_blocks * 512
      for root, _, names in os.walk(os.path.join(directory, str(last))) for name in names)
  saving = "".join(f" saving step {os.path.basename(path).split('.')[0]}" for path in partial)
  kept = "no checkpoint yet" if last is None else f"step {last} kept"
  return DiskFull(
      f"no space left on device in {workdir}{saving} (free: "
      f"{_megabytes(shutil.disk_usage(directory).free)}): the run needs about "
      f"{_megabytes((keep + 1) * size)} there for its checkpoints ({keep + 1} of "
      f"{_megabytes(size)}: keep_checkpoints={keep} and the one being written); the partial "
      f"checkpoint was removed, {kept}: free space and run the same command to resume")


def _run_sync_draining(coro):
  """orbax's run of a coroutine on a fresh event loop, which then waits for the loop's other
  tasks before closing it. When one tensorstore read or write failed (a truncated checkpoint
  file, a full disk), orbax closed the loop while the others were pending: each printed a
  "RuntimeError: Event loop is closed" traceback as it completed (176 after one truncated file),
  and the coroutines left unfinished printed more at exit."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    pending = asyncio.all_tasks(loop)
    if pending:
      loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    asyncio.set_event_loop(None)
    loop.close()


class _ReportedFaults(logging.Filter):
  """Drops orbax's logs of a full disk at any level (a traceback from each of its threads, and a
  warning from a write that failed after the others: seen once in 3 fresh-clone test runs): the
  run reports it in one line (DiskFull)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    return not (is_disk_full(record.exc_info[1]) if record.exc_info else
                "No space left on device" in record.getMessage())


# orbax's private function (orbax-checkpoint 0.12.8), hence the check: without the replacement
# a failed read or write is only noisier.
if hasattr(orbax_asyncio, "_run_sync_via_new_loop"):
  orbax_asyncio._run_sync_via_new_loop = _run_sync_draining
logging.getLogger("absl").addFilter(_ReportedFaults())


def _thread_exception(args: threading.ExceptHookArgs) -> None:
  """A full disk raised in one of orbax's writer threads: the run reports it in one line
  (DiskFull), without the thread's traceback; every other thread exception as Python prints it."""
  if not is_disk_full(args.exc_value):
    _default_thread_hook(args)


_default_thread_hook = threading.excepthook
threading.excepthook = _thread_exception


def sync_global_devices(name: str) -> None:
  """Waits for every process of a multi-process run (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  info, model, mesh = check_config(config, workdir)
  with jax.set_mesh(mesh):
    return _train(config, workdir, info, model, mesh)


def _train(config, workdir, info, model, mesh) -> Dict[str, Any]:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise config_lib.ConfigError(f"--workdir={workdir} cannot be created: {error}") from error
  # One writer per run: a second process on this workdir stops here, before it writes anything.
  lock = runlock.acquire(workdir) if jax.process_index() == 0 else None
  try:
    return _train_locked(config, workdir, info, model, mesh)
  finally:
    if lock is not None:
      lock.close()


def _train_locked(config, workdir, info, model, mesh) -> Dict[str, Any]:
  kind, t = info["kind"], config.train
  input_key = INPUT_KEY[kind]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  flops = models.flop_counts(config.model, info)
  tokens_per_step = t.batch_size * tokens_per_example(config.model, info)

  # Data: each process reads its own slice of every global batch; the slices become one array
  # split over the (data, expert) mesh axes. The stream's position is checkpointed.
  local_batch_size = t.batch_size // jax.process_count()
  loader = functools.partial(data.make_loader, config.data, batch_size=local_batch_size,
                             shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = loader(info["train_split"], seed=config.seed, shuffle=True)
  batch_sharding = sharding.batch_sharding(mesh)
  to_global = lambda batch: jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

  # Train state: params, router state ({} without routers that keep one), optimizer state,
  # completed steps, base rng (per-step keys fold in the step, so a resumed run draws the same
  # randomness). It is created already sharded: params by their logical axes, optimizer moments
  # like their params, the rest replicated.
  optimizer = make_optimizer(t)
  sample = next(loader(info["train_split"], seed=0, shuffle=False))
  init_variables = functools.partial(initial_variables, model, sample[input_key],
                                     **model_inputs(sample, kind))
  boxed_variables = jax.eval_shape(init_variables, jax.random.key(config.seed))
  param_shardings = sharding.logical_shardings(boxed_variables["params"], mesh,
                                               config.mesh.rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_var_shardings = jax.tree.map(lambda _: replicated, boxed_variables.get(STATE, {}))
  abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed_variables["params"]))
  state_shardings = {"step": replicated, "params": param_shardings, STATE: state_var_shardings,
                     "rng": replicated,
                     "opt_state": sharding.like_params(abstract_opt_state, param_shardings,
                                                       replicated)}

  @functools.partial(jax.jit, out_shardings=state_shardings)
  def init_state(rng, dense_params=None):
    variables = nn.meta.unbox(init_variables(rng))
    params = variables["params"]
    if dense_params is not None:
      params = upcycle.upcycle_params(params, dense_params, config.model.moe.granularity)
    return {"step": jnp.zeros((), jnp.int32), "params": params, STATE: variables.get(STATE, {}),
            "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed))}

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True))
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_state, jax.random.key(config.seed)), state_shardings)
  restored = restore_newest_readable(checkpoints, workdir, lambda step: ocp.args.Composite(
      state=ocp.args.StandardRestore(stored_state_names(abstract_state, checkpoints, step)),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  if restored is not None:  # restored into this mesh, whatever saved it
    state = routers.renamed_state(restored["state"])
    print(f"Resumed from step {int(state['step'])} of {workdir}", flush=True)
  elif t.upcycle_from:  # only a new run upcycles; a resumed one restored its own params above
    try:
      dense_params = upcycle.load_dense_params(t.upcycle_from)
    except Exception as error:  # orbax and tensorstore raise many types for damaged files
      raise config_lib.ConfigError(
          f"config.train.upcycle_from={t.upcycle_from!r}: its latest checkpoint does not "
          f"restore ({_reason(error)})") from error
    state = init_state(jax.random.key(config.seed), dense_params)
    print(f"Upcycled from the dense run {t.upcycle_from}", flush=True)
  else:
    state = init_state(jax.random.key(config.seed))
  start_step = int(state["step"])

  train_step_fn, eval_step_fn = make_steps(model, optimizer, t, kind,
                                           len(info.get("domains", ())))
  replay_shardings = (replicated,) if t.replay_from else ()
  # Traced steps run their own compiled variant, so the others run exactly as without a trace.
  train_steps = {traced: jax.jit(functools.partial(train_step_fn, trace=traced),
                                 in_shardings=(state_shardings, batch_sharding, *replay_shardings),
                                 out_shardings=(state_shardings, replicated), donate_argnums=0)
                 for traced in (False, True)}
  expected_choices = trace_lib.expected_choices(config, tokens_per_example(config.model, info))
  if t.replay_from:  # again: the restore may have fallen back to an older checkpoint
    trace_lib.check_replay(t.replay_from, range(start_step + 1, t.num_steps + 1),
                           expected_choices, t.microbatches)
  eval_step = jax.jit(eval_step_fn, in_shardings=(param_shardings, state_var_shardings,
                                                   batch_sharding), out_shardings=replicated)

  def evaluate(state) -> Dict[str, float]:
    batches = loader(info["eval_split"], seed=0, shuffle=False, num_epochs=1,
                     drop_remainder=False)
    totals = {}
    for i, batch in enumerate(batches):
      if t.eval_max_batches is not None and i >= t.eval_max_batches:
        break
      batch = to_global(batch)
      for key, value in jax.device_get(eval_step(state["params"], state[STATE], batch)).items():
        totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return eval_record(totals, kind, info.get("domains", ()))

  writer = MetricWriter(workdir, start_step)
  if start_step == 0:
    writer.write({"step": 0, **{f"model/{k}": v for k, v in flops.items()}})
  print("Model: " + ", ".join(f"{k} {v:,.0f}" for k, v in flops.items()), flush=True)
  progress = tqdm.tqdm(total=t.num_steps, initial=start_step, disable=not sys.stderr.isatty(),
                       desc=os.path.basename(os.path.normpath(workdir)), unit="step")
  history, last_train, last_eval = [], {}, {}
  interval = Interval()
  load_monitor = monitor.LoadMonitor(t.dead_expert_load, t.collapse_expert_share,
                                     t.monitor_patience)
  full = None  # a full disk, whichever write met it (most often an asynchronous save)
  try:
    with runlock.deferred_interrupts():
      for step in range(start_step + 1, t.num_steps + 1):
        if runlock.stop_requested():  # a Ctrl-C or SIGTERM during the last step: stop here
          raise KeyboardInterrupt
        replay = (trace_lib.load_replay(t.replay_from, step, expected_choices, t.microbatches),
                  ) if t.replay_from else ()
        state, metrics = train_steps[trace_lib.is_traced(t, step)](
            state, to_global(next(train_iter)), *replay)
        metrics = jax.device_get(metrics)
        recorded = metrics.pop("trace", None)
        if not np.isfinite(metrics["loss"]):
          last = checkpoints.latest_step()
          raise FloatingPointError(
              f"loss is {metrics['loss']} at step {step}; run stopped, nothing saved after it "
              + (f"(last checkpoint: step {last})" if last is not None
                 else "(no checkpoint yet: a rerun starts from step 0)"))
        if recorded is not None and jax.process_index() == 0:
          interval.pause()  # throughput counts the step, not the writing
          trace_lib.write(workdir, step, recorded, t.microbatches)
          interval.resume()
        history.append(metrics)
        progress.update(1)
        logs, evaluates, saves = (step % every == 0 or step == t.num_steps for every in
                                  (t.log_every, t.eval_every, t.checkpoint_every))
        if not (logs or evaluates or saves):
          continue
        interval.pause()  # throughput excludes logging, evaluation and checkpoints
        if logs:
          last_train = _train_record(step, history, interval.measure(), tokens_per_step,
                                     float(learning_rate_schedule(t)(step - 1)))
          load_metrics, warnings = load_monitor.update(last_train)
          last_train.update(load_metrics)
          for warning in warnings:
            print(f"step {step:>6}  warning: {warning}", flush=True)
          writer.write(last_train)
          progress.set_postfix(loss=f"{last_train['train/loss']:.4f}",
                               tok_s=f"{last_train['tokens_per_s']:.0f}")
          if progress.disable:
            print(f"step {step:>6}  loss {last_train['train/loss']:.4f}  "
                  f"tokens/s {last_train['tokens_per_s']:.0f}", flush=True)
          history = []
        if evaluates:
          last_eval = {"step": step, **evaluate(state)}
          writer.write(last_eval)
          print(f"step {step:>6}  " + "  ".join(
              f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step"), flush=True)
        if saves:
          checkpoints.save(step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=grain.checkpoint.CheckpointSave(train_iter)))
        interval.resume()
  except Exception as error:
    if not is_disk_full(error):
      raise
    full = error
  finally:
    try:
      checkpoints.wait_until_finished()  # a pending save completes even when the run fails
    except Exception as error:
      if not is_disk_full(error):
        raise
      full = error
    checkpoints.close()
    progress.close()
    writer.close()
  if full is not None:  # one line, once orbax's threads are done with the partial checkpoint
    state_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(abstract_state))
    raise disk_full(os.fspath(checkpoints.directory), workdir, t.keep_checkpoints,
                    state_bytes) from None

  final_path = os.path.join(workdir, "final_metrics.json")
  if start_step == t.num_steps and os.path.exists(final_path):  # finished before: report it
    with open(final_path) as f:
      return json.load(f)
  final = {"status": "finished", "step": t.num_steps, "train": last_train, "eval": last_eval,
           "model": flops}
  if jax.process_index() == 0:
    with open(final_path, "w") as f:
      json.dump(final, f, indent=2)
  return final
