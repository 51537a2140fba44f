"""Analysis of trained runs and sweeps, as pandas DataFrames (definitions: docs/ROUTING.md).

Three sources of data:
  metrics.jsonl  what training logged; cheap, no model needed:
                   loss_curves, expert_load, routing_metrics
  trace/         what every MoE layer routed in the traced train steps (train.trace_steps):
                   routing_trace
  checkpoints    `routing_decisions` restores a checkpoint, runs the model on evaluation batches
                 and records, for every token and MoE layer, the experts it was routed to. The
                 rest are built from those decisions (pass either a run directory, with the
                 options of routing_decisions, or a frame it returned, to analyse it again
                 without recomputing): specialization, class_expert_table, layer_transitions,
                 expert_choice_coverage. routing_consistency (compare_decisions) compares
                 two checkpoints.
Sweeps (the layout of moe_jax.sweep): sweep_overrides, sweep_table, group_labels,
sweep_summary.

A MoE layer is named by its block index, the int `layer` (the module `block_<layer>/moe`).
Dense models have no MoE layers: the metrics functions return empty frames, the checkpoint
functions raise ValueError.

  run = load_run("runs/vit_switch")
  decisions = routing_decisions("runs/vit_switch", num_batches=4)
  specialization(decisions)          # MI between top-1 expert and class, per layer
  class_expert_table(decisions, layer=1, normalize="label")
"""
from __future__ import annotations

import dataclasses
import html
import itertools
import json
import math
import os
import re
import string
from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
from etils import epath

from moe_jax import compare, data, models, routers, sweep
from moe_jax import trace as trace_lib
from moe_jax.config import upgrade
from moe_jax.layers import MoeLayer
from moe_jax.models import common
from moe_jax.train import INPUT_KEY, model_inputs, tokens_per_example

BYTE_CLASSES = ("letter", "digit", "whitespace", "punctuation", "other")
ROUTING_STATS = ("dropped_fraction", "unrouted_fraction", "experts_per_token", "router_entropy",
                 "top1_confidence", "load_cv", "max_violation", "max_logit")
# The load monitor's summary of each record (moe_jax/monitor.py).
LOAD_STATS = ("load_min", "load_p10", "load_p50", "load_p90", "load_max", "top_expert",
              "bottom_expert", "dead_experts", "collapsed")
_ROUTING_KEY = re.compile(r"^train/routing/block_(\d+)/moe/(\w+)$")
NO_EXPERT = -1  # top1 of a token that no expert took (expert choice only)

Source = Union[str, os.PathLike, pd.DataFrame]  # a run directory or routing_decisions' frame


# ----------------------------------------------------------------------------------------------
# A run directory and what training logged.


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run directory holds (see moe_jax/train.py).

  Attributes:
    run_dir: the directory.
    config: the resolved config (config.json).
    records: metrics.jsonl in order: the model record (step 0, `model/...` counts), train
      records (`train/...`) and eval records (`eval/...`).
    final: final_metrics.json, None while the run has not finished.
  """
  run_dir: str
  config: ml_collections.ConfigDict
  records: List[Dict[str, Any]]
  final: Optional[Dict[str, Any]]

  @property
  def train_records(self) -> List[Dict[str, Any]]:
    return [r for r in self.records if "train/loss" in r]

  @property
  def eval_records(self) -> List[Dict[str, Any]]:
    return [r for r in self.records if "eval/loss" in r]

  @property
  def moe_layers(self) -> Dict[int, MoeLayer]:
    """{block index: its MoeLayer} ({} for a dense model)."""
    model = self.config.model
    return {index: make() for index, make
            in common.moe_layers(model, causal=model.name == "lm").items()}

  @property
  def checkpoint_steps(self) -> List[int]:
    """Steps of the finished checkpoints, ascending (one being written has another name)."""
    directory = os.path.join(self.run_dir, "checkpoints")
    if not os.path.isdir(directory):
      return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_run(run_dir: Union[str, os.PathLike]) -> Run:
  """Reads config.json, metrics.jsonl and final_metrics.json of a run (finished or not)."""
  run_dir = os.fspath(run_dir)
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(upgrade(json.load(f)))
  records = []
  path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      # A line without its newline is still being written by a running job: left for later.
      records = [json.loads(line) for line in f if line.endswith("\n")]
  final_path = os.path.join(run_dir, "final_metrics.json")
  final = None
  if os.path.exists(final_path):
    with open(final_path) as f:
      final = json.load(f)
  return Run(run_dir, config, records, final)


def loss_curves(run_dir) -> pd.DataFrame:
  """Loss and accuracy over training, one row per logged step and split.

  Columns: step, split ('train' | 'eval'), loss (task cross-entropy: train/task_loss,
  eval/loss), accuracy, total_loss (train only: loss + weighted load-balance and z losses; NaN
  for eval). Train rows are means over the steps since the previous train record.
  """
  rows = []
  for r in load_run(run_dir).records:
    if "train/loss" in r:
      rows.append({"step": r["step"], "split": "train", "loss": r["train/task_loss"],
                   "accuracy": r["train/accuracy"], "total_loss": r["train/loss"]})
    elif "eval/loss" in r:
      rows.append({"step": r["step"], "split": "eval", "loss": r["eval/loss"],
                   "accuracy": r["eval/accuracy"], "total_loss": math.nan})
  return pd.DataFrame(rows, columns=["step", "split", "loss", "accuracy", "total_loss"])


def _routing_records(run: Run):
  """(step, layer, {stat: value}) for every MoE layer of every train record."""
  for record in run.train_records:
    layers: Dict[int, Dict[str, Any]] = {}
    for key, value in record.items():
      if match := _ROUTING_KEY.match(key):
        layers.setdefault(int(match[1]), {})[match[2]] = value
    for layer, stats in sorted(layers.items()):
      yield record["step"], layer, stats


def expert_load(run_dir) -> pd.DataFrame:
  """Each expert's share of the router's choices over training (tidy; empty for a dense model).

  Columns: step, layer, expert, load. Load is the share before capacity (dropped choices count),
  averaged over the steps since the previous train record; per (step, layer) it sums to 1.
  """
  rows = [{"step": step, "layer": layer, "expert": expert, "load": load}
          for step, layer, stats in _routing_records(load_run(run_dir))
          for expert, load in enumerate(stats["expert_load"])]
  return pd.DataFrame(rows, columns=["step", "layer", "expert", "load"])


def routing_metrics(run_dir) -> pd.DataFrame:
  """The routing statistics logged in training, per step and MoE layer (empty when dense).

  Columns: step, layer, num_experts, dropped_fraction, unrouted_fraction, experts_per_token,
  router_entropy (mean H(p) in nats), entropy_max (ln E, the entropy of a uniform router),
  top1_confidence, load_cv, max_violation, max_logit (definitions: moe_jax/metrics.py), the
  registered routers' own statistics (routers.Statistic: MoE++'s zero_computation_share,
  SMEAR's merge_entropy, ...), then the load monitor's load_min,
  load_p10, load_p50, load_p90, load_max (multiples of the mean load), top_expert, bottom_expert,
  dead_experts, collapsed (moe_jax/monitor.py); NaN where the router does not log a statistic or
  a run predates it.
  """
  own = tuple(routers.statistic_directions())
  rows = [{"step": step, "layer": layer, "num_experts": len(stats["expert_load"]),
           **{name: stats.get(name, math.nan) for name in ROUTING_STATS + own + LOAD_STATS},
           "entropy_max": math.log(len(stats["expert_load"]))}
          for step, layer, stats in _routing_records(load_run(run_dir))]
  columns = ["step", "layer", "num_experts", "dropped_fraction", "unrouted_fraction",
             "experts_per_token", "router_entropy", "entropy_max", "top1_confidence", "load_cv",
             "max_violation", "max_logit", *own, *LOAD_STATS]
  return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# Routing decisions from a checkpoint.


def restore_variables(run_dir, step: int) -> Dict[str, Any]:
  """The model variables of checkpoint `step`, as model.apply takes them: {'params'} and, for
  routers with state, {'router_state'} (under its older name 'router_bias' in checkpoints written
  before the rename); on this process's first device.

  Restores onto a target built from the checkpoint's own shapes, so a checkpoint saved on any
  mesh (8 GPUs, a pod) opens on one CPU; the optimizer state is not read.
  """
  path = epath.Path(os.path.abspath(os.fspath(run_dir))) / "checkpoints" / str(step) / "state"
  # The item's handler itself: a Checkpointer would look for step metadata inside the item.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = handler.metadata(path).tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {key: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), stored[key])
        for key in ("params", routers.STATE, routers.LEGACY_STATE) if stored.get(key)}
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  finally:
    handler.close()
  return routers.renamed_state(restored)


def _byte_class_table() -> np.ndarray:
  table = np.array(["other"] * 256, dtype=object)
  for chars, name in ((string.ascii_letters, "letter"), (string.digits, "digit"),
                      (string.whitespace, "whitespace"), (string.punctuation, "punctuation")):
    table[[ord(c) for c in chars]] = name
  return table


_BYTE_CLASS_OF = _byte_class_table()  # [256] byte value -> class name


def byte_classes(values: np.ndarray) -> np.ndarray:
  """Byte values int [...] -> their BYTE_CLASSES names (ASCII; bytes >= 128 are 'other')."""
  return _BYTE_CLASS_OF[np.asarray(values)]


def _moe_layers(run: Run) -> Dict[int, MoeLayer]:
  layers = run.moe_layers
  if not layers:
    raise ValueError(f"{run.run_dir} is a dense model (model.moe.router='dense'): it has no MoE "
                     "layers to analyse")
  return layers


def _check_step(run: Run, step: Optional[int]) -> int:
  """`step`, or the latest checkpoint when None; ValueError naming the steps there are."""
  steps = run.checkpoint_steps
  if not steps:
    raise ValueError(f"{run.run_dir} has no checkpoints")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"{run.run_dir} has no checkpoint at step {step}; it has {steps}")
  return step


def _layer_decisions(sown: Dict[str, np.ndarray], num_tokens: int) -> Dict[str, Any]:
  """One layer's decisions for its first num_tokens tokens (token order) from what it sowed:
  probs, selected and processed, [G,S,E] each (see RoutingOutput.token_experts)."""
  probs, chosen, assigned = (sown[key].reshape(-1, sown["probs"].shape[-1])[:num_tokens]
                             for key in ("probs", "selected", "processed"))  # [N,E] each
  order = np.argsort(-probs, axis=1, kind="stable")  # experts by probability; ties: lowest first
  sorted_probs = np.take_along_axis(probs, order, axis=1)
  chosen = np.take_along_axis(chosen, order, axis=1)
  experts = [tuple(o[c].tolist()) for o, c in zip(order, chosen)]
  top_probs = [tuple(p[c].tolist()) for p, c in zip(sorted_probs, chosen)]
  # Expert choice: a token's most probable expert need not be one that took it.
  first = np.argmax(chosen, axis=1)[:, None]  # the first chosen in probability order
  routed = chosen.any(axis=1)
  second = sorted_probs[:, 1] if probs.shape[1] > 1 else 0.0
  return {"experts": experts, "probs": top_probs,
          "top1": np.where(routed, np.take_along_axis(order, first, 1)[:, 0], NO_EXPERT),
          "top1_prob": np.where(routed, np.take_along_axis(sorted_probs, first, 1)[:, 0],
                                np.nan),
          "margin": sorted_probs[:, 0] - second, "assigned": assigned.sum(axis=1),
          "num_experts": probs.shape[1]}


DECISION_COLUMNS = ["layer", "router", "num_experts", "example", "position", "token", "label",
                    "category", "experts", "probs", "top1", "top1_prob", "margin", "assigned"]


def _decisions_at(run_dir, steps: Sequence[Optional[int]], num_batches: Optional[int],
                  split: Optional[str], batch_size: Optional[int]) -> List[pd.DataFrame]:
  """routing_decisions at several checkpoints over the same batches, compiling once."""
  run = load_run(run_dir)
  layers = _moe_layers(run)
  steps = [_check_step(run, step) for step in steps]
  config = run.config
  info = data.dataset_info(config.data)
  kind, per_example = info["kind"], tokens_per_example(config.model, info)
  model = models.get_model(config.model, info)

  @jax.jit
  def layer_decisions(variables, inputs, extras):
    _, state = model.apply(variables, inputs, **extras, deterministic=True,
                           mutable=["intermediates"])
    return {i: state["intermediates"][f"block_{i}"]["moe"]["decisions"][0] for i in layers}

  # The evaluation stream as training reads it: same order and, by default, the same batch
  # size, so groups (and so capacity and expert choice's competition) are the same.
  batches = data.make_loader(config.data, split or info["eval_split"],
                             batch_size=batch_size or config.train.batch_size, seed=0,
                             shuffle=False, num_epochs=1, drop_remainder=False)
  if kind == "image":
    categories = pd.CategoricalDtype(info["class_names"], ordered=True)
  else:
    categories = pd.CategoricalDtype(BYTE_CLASSES, ordered=True)
  variables = [restore_variables(run.run_dir, step) for step in steps]
  frames: List[List[pd.DataFrame]] = [[] for _ in steps]
  first_example = 0
  for batch in itertools.islice(batches, num_batches):  # None: all of them
    inputs = batch[INPUT_KEY[kind]]
    batch_examples = inputs.shape[0]
    num_tokens = batch_examples * per_example
    example = first_example + np.repeat(np.arange(batch_examples), per_example)
    position = np.tile(np.arange(per_example), batch_examples)
    if kind == "image":
      label = np.repeat(batch["label"], per_example)
      category = np.asarray(info["class_names"], dtype=object)[label]
    else:
      label = inputs.reshape(-1)
      category = byte_classes(label)
    real = np.repeat(batch["mask"], per_example)  # padding examples of the last batch: dropped
    tokens = {"example": example, "position": position,
              "token": example * per_example + position, "label": label, "category": category}
    if info.get("domains"):
      tokens["domain"] = np.asarray(info["domains"], dtype=object)[
          np.repeat(batch["domain"], per_example)]
    for frames_at, v in zip(frames, variables):
      sown = jax.device_get(layer_decisions(v, inputs, model_inputs(batch, kind)))
      for layer_index, layer in layers.items():
        columns = {"layer": layer_index, "router": layer.router, **tokens,
                   **_layer_decisions(sown[layer_index], num_tokens)}
        frame = pd.DataFrame(columns)[DECISION_COLUMNS + ["domain"] * ("domain" in tokens)]
        frames_at.append(frame[real].reset_index(drop=True))
    first_example += batch_examples
  result = []
  for step, frames_at in zip(steps, frames):
    frame = pd.concat(frames_at, ignore_index=True)
    frame["category"] = frame["category"].astype(categories)
    if "domain" in frame:  # every domain a row of the tables, in label order
      frame["domain"] = frame["domain"].astype(pd.CategoricalDtype(info["domains"],
                                                                   ordered=True))
    result.append(frame.sort_values(["layer", "token"], ignore_index=True).assign(step=step))
  return result


def routing_decisions(run_dir, step: Optional[int] = None, *, num_batches: Optional[int] = 1,
                      split: Optional[str] = None,
                      batch_size: Optional[int] = None) -> pd.DataFrame:
  """Where every token of some evaluation batches goes, per MoE layer, at a checkpoint.

  Restores checkpoint `step` (None: the latest), runs the model deterministically (as in
  evaluation) on the first `num_batches` batches of `split` (None: the run's eval split; with
  num_batches=None the whole split) of `batch_size` examples (None: the run's train.batch_size,
  so tokens are grouped as in evaluation), and reads what each MoE layer routed
  (RoutingOutput.token_experts, sown in 'intermediates'). Padding examples of a partial last
  batch are left out. Every router is covered: loss_free routes with the checkpoint's bias.

  Returns one row per (layer, token), sorted by layer then token, with columns:
    layer        block index of the MoE layer
    router       its router (a registered name, routers.names())
    num_experts  E of that layer
    example      index of the example in the stream (0-based)
    position     token position in the example. ViT: 0 is the class token (pooling='cls'), then
                 the patches in raster order; LM: the byte's position
    token        example * tokens_per_example + position: the same token in every layer and at
                 every checkpoint
    label        ViT: the image's class id; LM: the byte value (the input token)
    category     ordered categorical. ViT: the class name; LM: the byte's class, one of
                 BYTE_CLASSES (letter, digit, whitespace, punctuation, other)
    experts      tuple of expert ids by descending router probability. Tokens-choose routers:
                 the choices the router made (whether or not capacity kept them; loss_free:
                 the top-k of probability + bias; hash, random: the fixed one); expert choice:
                 the experts that took the token (possibly none); soft: the expert with the
                 largest share of the token's combine weights
    probs        tuple, the router probabilities of those experts (hash, random: one-hot; soft:
                 each expert's combine weights summed over its slots)
    top1         experts[0]; NO_EXPERT (-1) for a token no expert took (expert choice)
    top1_prob    probs[0] (NaN with no expert)
    margin       top-1 minus top-2 router probability (over all experts)
    assigned     how many experts processed the token at evaluation capacity (tokens-choose:
                 the choices that got a slot; expert choice: len(experts); soft: E)
    step         the checkpoint's step
    domain       (data with domain labels only) ordered categorical: the domain of the token's
                 sequence, so that class_expert_table and specialization take by='domain'
  Raises ValueError for a dense model or a step with no checkpoint.
  """
  return _decisions_at(run_dir, [step], num_batches, split, batch_size)[0]


TRACE_COLUMNS = ["layer", "router", "num_experts", "example", "position", "token", "experts",
                 "top1", "assigned", "gates", "step"]


def routing_trace(run_dir, step: int) -> pd.DataFrame:
  """What every MoE layer routed in train step `step` of a traced run (train.trace_steps,
  moe_jax/trace.py), without recomputing anything: one row per (layer, token) of the step's
  batch, sorted by layer then token, in routing_decisions' terms.

  Columns: layer, router, num_experts, example (index in the step's batch), position, token
  (example * tokens_per_example + position), experts (tuple: the router's choices before
  capacity, in its order: descending probability, loss_free's of probability + bias), top1
  (experts[0]; NO_EXPERT for none), assigned (choices that got a slot), gates (tuple of the
  combine weights of `experts`, 0 for a dropped choice; None without train.trace_gates), step.
  Raises ValueError naming the traced steps when `step` has no trace.
  """
  run = load_run(run_dir)
  traced = trace_lib.traced_steps(run.run_dir)
  if step not in traced:
    raise ValueError(f"{run.run_dir} has no routing trace of step {step}; traced steps: "
                     f"{traced or 'none (set train.trace_steps)'}")
  microbatches, layers = trace_lib.read(run.run_dir, step)
  config = run.config
  per_example = tokens_per_example(config.model, data.dataset_info(config.data))
  frames = []
  for index, layer in _moe_layers(run).items():
    arrays = layers[f"block_{index}/moe"]
    num_groups, group_size, _ = arrays["choices"].shape
    # Group g of micro-batch i holds its tokens from g S on; micro-batch i: examples i, i + n, ...
    micro, local = np.divmod(np.arange(num_groups * group_size), num_groups // microbatches
                             * group_size)
    real = local < config.train.batch_size // microbatches * per_example  # not group padding
    example = local[real] // per_example * microbatches + micro[real]
    per_token = {name: array.reshape(num_groups * group_size, -1)[real]
                 for name, array in arrays.items()}  # [tokens, K] each
    choices = per_token["choices"]
    chosen = choices < layer.num_experts
    gates = per_token.get("gates")
    frame = pd.DataFrame({
        "layer": index, "router": layer.router, "num_experts": layer.num_experts,
        "example": example, "position": local[real] % per_example,
        "experts": [tuple(c[m].tolist()) for c, m in zip(choices, chosen)],
        "top1": np.where(chosen[:, 0], choices[:, 0], NO_EXPERT),
        "assigned": per_token["kept"].sum(axis=1),
        "gates": (None if gates is None
                  else [tuple(g[m].tolist()) for g, m in zip(gates, chosen)])})
    frame["token"] = frame["example"] * per_example + frame["position"]
    frames.append(frame)
  return (pd.concat(frames, ignore_index=True).assign(step=step)[TRACE_COLUMNS]
          .sort_values(["layer", "token"], ignore_index=True))


def _decisions(source: Source, options: Dict[str, Any]) -> pd.DataFrame:
  """The decisions `source` gives: computed for a run directory, as is for a frame."""
  if isinstance(source, pd.DataFrame):
    if options:
      raise TypeError(f"options {sorted(options)} apply to a run directory, not to decisions "
                      "already computed")
    return source
  return routing_decisions(source, **options)


def _expert_axis(decisions: pd.DataFrame) -> List[int]:
  """The expert ids of a layer's table: 0..E-1, with NO_EXPERT first when a token had none."""
  experts = list(range(int(decisions["num_experts"].iloc[0])))
  return ([NO_EXPERT] if (decisions["top1"] == NO_EXPERT).any() else []) + experts


def _layer(decisions: pd.DataFrame, layer: int) -> pd.DataFrame:
  rows = decisions[decisions["layer"] == layer]
  if rows.empty:
    raise ValueError(f"no MoE layer {layer} in the decisions; layers: "
                     f"{sorted(decisions['layer'].unique())}")
  return rows


# ----------------------------------------------------------------------------------------------
# Built from the decisions.


def entropy(counts: np.ndarray) -> float:
  """Entropy in nats of the distribution proportional to counts [...]."""
  p = np.asarray(counts, np.float64).ravel()
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())


def mutual_information(table: np.ndarray) -> float:
  """Mutual information in nats of a contingency table [X, Y] of counts:
  sum_xy p(x,y) ln(p(x,y) / (p(x) p(y))), with 0 ln 0 = 0."""
  joint = np.asarray(table, np.float64)
  joint = joint / joint.sum()
  outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
  nonzero = joint > 0
  return float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())


def class_expert_table(source: Source, layer: int, *, by: str = "category",
                       normalize: Optional[str] = None, **options) -> pd.DataFrame:
  """Label x top-1 expert counts of one MoE layer.

  Args:
    source: a run directory (decisions computed with **options, see routing_decisions) or a
      routing_decisions frame.
    layer: block index of the MoE layer.
    by: the label column: 'category' (ViT class names, every class a row; LM byte classes) or
      'label' (class ids; LM byte values, the ones seen).
    normalize: None (counts), 'label' (each row sums to 1: which experts a label goes to) or
      'expert' (each column sums to 1: what an expert receives; an unused expert's column is 0).
  Returns a DataFrame indexed by label, one column per expert 0..E-1 (NO_EXPERT first when some
  token had no expert); the counts sum to the layer's tokens.
  """
  if normalize not in (None, "label", "expert"):
    raise ValueError(f"normalize={normalize!r} must be None, 'label' or 'expert'")
  rows = _layer(_decisions(source, options), layer)
  table = (rows.groupby([by, "top1"], observed=False).size().unstack("top1", fill_value=0)
           .reindex(columns=_expert_axis(rows), fill_value=0))
  table.columns.name = "expert"
  if normalize == "label":
    table = table.div(table.sum(axis=1).replace(0, 1), axis=0)
  elif normalize == "expert":
    table = table.div(table.sum(axis=0).replace(0, 1), axis=1)
  return table


def specialization(source: Source, *, by: str = "category", **options) -> pd.DataFrame:
  """How much the top-1 expert tells about the label, per MoE layer.

  Args: source, by and options as in class_expert_table. A token with no expert (expert choice)
  counts under NO_EXPERT, one more value of the expert variable.
  Returns columns: layer, tokens, mi (mutual information in nats between top-1 expert and
  label), h_label, h_expert (entropies in nats), mi_normalized = mi / min(h_label, h_expert):
  0 when expert and label are independent, 1 when one determines the other (NaN when either
  entropy is 0).
  """
  decisions = _decisions(source, options)
  rows = []
  for layer in sorted(decisions["layer"].unique()):
    table = class_expert_table(decisions, layer, by=by).to_numpy()
    h_label, h_expert = entropy(table.sum(axis=1)), entropy(table.sum(axis=0))
    mi = mutual_information(table)
    bound = min(h_label, h_expert)
    rows.append({"layer": int(layer), "tokens": int(table.sum()), "mi": mi, "h_label": h_label,
                 "h_expert": h_expert, "mi_normalized": mi / bound if bound > 0 else math.nan})
  return pd.DataFrame(rows, columns=["layer", "tokens", "mi", "h_label", "h_expert",
                                     "mi_normalized"])


def layer_transitions(source: Source, layer_a: int, layer_b: int, *,
                      normalize: Optional[str] = None, **options) -> pd.DataFrame:
  """Top-1 expert in layer_a x top-1 expert in layer_b, for the same tokens.

  Args: source and options as in class_expert_table; normalize None (counts: everything sums to
  the token count, row e to the tokens whose top-1 in layer_a is e) or 'row' (each row with
  tokens sums to 1: P(expert in layer_b | expert in layer_a)).
  Returns a DataFrame indexed by layer_a's expert (index name 'layer <a>'), one column per
  layer_b expert (columns name 'layer <b>'); NO_EXPERT rows/columns as in class_expert_table.
  """
  if normalize not in (None, "row"):
    raise ValueError(f"normalize={normalize!r} must be None or 'row'")
  decisions = _decisions(source, options)
  a, b = _layer(decisions, layer_a), _layer(decisions, layer_b)
  pairs = a[["token", "top1"]].merge(b[["token", "top1"]], on="token", suffixes=("_a", "_b"))
  table = (pd.crosstab(pairs["top1_a"], pairs["top1_b"])
           .reindex(index=_expert_axis(a), columns=_expert_axis(b), fill_value=0))
  table.index.name, table.columns.name = f"layer {layer_a}", f"layer {layer_b}"
  if normalize == "row":
    table = table.div(table.sum(axis=1).replace(0, 1), axis=0)
  return table


def expert_choice_coverage(source: Source, **options) -> pd.DataFrame:
  """Histogram of how many experts processed each token in evaluation, per MoE layer.

  For expert choice this is its coverage (some tokens get several experts, some none); for
  tokens-choose routers it counts the top-k choices that found capacity (k when none dropped);
  soft routing gives every token all E experts.
  Args: source and options as in class_expert_table.
  Returns columns: layer, num_assigned (0 .. the most experts a token can have: k, or E for
  expert choice and soft), tokens, fraction (of the layer's tokens; sums to 1 per layer).
  """
  decisions = _decisions(source, options)
  frames = []
  for layer, rows in decisions.groupby("layer"):
    if routers.get(rows["router"].iloc[0]).default_k is None:  # expert choice, soft: no k
      most = int(rows["num_experts"].iloc[0])
    else:  # every token has its k choices
      most = len(rows["experts"].iloc[0])
    counts = rows["assigned"].value_counts().reindex(range(most + 1), fill_value=0)
    frames.append(pd.DataFrame({"layer": int(layer), "num_assigned": counts.index,
                                "tokens": counts.to_numpy(),
                                "fraction": counts.to_numpy() / len(rows)}))
  return pd.concat(frames, ignore_index=True)


def compare_decisions(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
  """How much the routing of the same tokens differs between two routing_decisions frames.

  Tokens are matched by (layer, token), so a and b must come from the same batches. Per token,
  overlap = |experts_a & experts_b| / max(|experts_a|, |experts_b|) (the top-k overlap / k for
  tokens-choose routers; 1 when both sets are empty).
  Returns columns: layer, step_a, step_b, tokens, top1_agreement (share of tokens whose top1 is
  the same), topk_overlap (mean overlap).
  """
  columns = ["layer", "token", "experts", "top1"]
  pairs = a[columns].merge(b[columns], on=["layer", "token"], suffixes=("_a", "_b"))
  pairs["overlap"] = [len(set(x) & set(y)) / max(len(x), len(y)) if x or y else 1.0
                      for x, y in zip(pairs["experts_a"], pairs["experts_b"])]
  pairs["agree"] = pairs["top1_a"] == pairs["top1_b"]
  summary = pairs.groupby("layer").agg(tokens=("token", "size"), top1_agreement=("agree", "mean"),
                                       topk_overlap=("overlap", "mean")).reset_index()
  summary.insert(1, "step_a", int(a["step"].iloc[0]))
  summary.insert(2, "step_b", int(b["step"].iloc[0]))
  return summary


def routing_saturation(run_dir, steps: Optional[Sequence[int]] = None, *,
                       num_batches: Optional[int] = 1, split: Optional[str] = None,
                       batch_size: Optional[int] = None) -> pd.DataFrame:
  """Routing saturation (Muennighoff et al. 2024, OLMoE): per MoE layer and checkpoint step t,
  the share of each token's top-k at t that is also in its top-k at the final checkpoint,
  averaged over tokens (compare_decisions' topk_overlap; 1 at the final step itself).

  steps: the checkpoints to compare (None: every checkpoint of the run); options as in
  routing_decisions. Returns columns: layer, step, final_step, tokens, saturation,
  top1_agreement.
  """
  run = load_run(run_dir)
  final = _check_step(run, None)
  steps = sorted(set(run.checkpoint_steps if steps is None else steps) | {final})
  decisions = _decisions_at(run_dir, steps, num_batches, split, batch_size)
  return saturation_table(decisions)


def saturation_table(decisions: Sequence[pd.DataFrame]) -> pd.DataFrame:
  """routing_saturation's table from routing_decisions frames of the same tokens at several
  steps, the last one the final step."""
  final = decisions[-1]
  frames = [compare_decisions(at, final) for at in decisions]
  table = pd.concat(frames, ignore_index=True).rename(
      columns={"step_a": "step", "step_b": "final_step", "topk_overlap": "saturation"})
  return table[["layer", "step", "final_step", "tokens", "saturation", "top1_agreement"]
               ].sort_values(["layer", "step"], ignore_index=True)


def routing_consistency(run_dir, step_a: int, step_b: Optional[int] = None, *,
                        num_batches: Optional[int] = 1, split: Optional[str] = None,
                        batch_size: Optional[int] = None) -> pd.DataFrame:
  """compare_decisions of checkpoints step_a and step_b (None: the latest) on the same batches.

  Options as in routing_decisions. Returns compare_decisions' columns: layer, step_a, step_b,
  tokens, top1_agreement, topk_overlap.
  """
  return compare_decisions(*_decisions_at(run_dir, [step_a, step_b], num_batches, split,
                                          batch_size))


# ----------------------------------------------------------------------------------------------
# Sweeps (the layout of moe_jax.sweep: <sweep>/sweep.json and one run directory per member).


def group_labels(table: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
  """A label per row from the override columns `keys`: 'gshard, capacity_factor=1.25'.

  config_arg shows its value alone and other keys their last dotted part; 'all' without keys.
  """
  def label(row) -> str:
    return ", ".join(sweep.label_part(key, row[key]) for key in keys) or "all"

  return table.apply(label, axis=1) if len(table) else pd.Series([], dtype=object)


def _sweep_json(sweep_dir) -> Dict[str, Any]:
  with open(os.path.join(os.fspath(sweep_dir), "sweep.json")) as f:
    return json.load(f)


def sweep_definition(sweep_dir) -> Dict[str, Any]:
  """The definition the sweep ran (moe_jax.sweep.load_sweep's: base, fixed, grid, members,
  seeds, baseline), from its sweep.json."""
  return _sweep_json(sweep_dir)["definition"]


def sweep_overrides(sweep_dir) -> List[str]:
  """The keys the members of a sweep override (the grid and member keys), in sweep.json order."""
  members = _sweep_json(sweep_dir)["members"]
  return list(dict.fromkeys(key for member in members for key in member["overrides"]))


def sweep_table(sweep_dir) -> pd.DataFrame:
  """moe_jax.sweep.collect_results (one row per member, with its group: members that differ
  only by seed share one) and the member's run directory, run_dir."""
  table = sweep.collect_results(os.fspath(sweep_dir))
  table["run_dir"] = [os.path.join(os.fspath(sweep_dir), name) for name in table["name"]]
  return table


SUMMARY_METRICS = ("eval/loss", "eval/accuracy", "eval/bits_per_byte", "tokens_per_s",
                   "active_params", "total_params", "dropped_fraction", "load_cv",
                   "max_violation")


def sweep_summary(table: pd.DataFrame,
                  metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
  """Mean and standard deviation over the finished members of each group (over seeds).

  table: from sweep_table. Returns one row per group (in order of appearance) with columns
  members (finished members averaged) and, for each metric present, '<metric>' (mean) and
  '<metric> std' (NaN for a single member).
  """
  finished = table[table["status"] == "finished"]
  present = [m for m in metrics if m in finished.columns]
  grouped = finished.groupby("group", sort=False)
  summary = pd.DataFrame({"members": grouped.size()})
  for metric in present:
    summary[metric] = grouped[metric].mean()
    summary[f"{metric} std"] = grouped[metric].std()
  return summary


# ----------------------------------------------------------------------------------------------
# The sweep report (notebooks/analyze_sweep.ipynb): sentences, a formatted table, curves over seeds.


def quality_metrics(table: pd.DataFrame) -> List[str]:
  """The metrics a sweep's quality is read from, of those its finished members have:
  eval/bits_per_byte for a language model (its eval/loss is the same in nats), else
  eval/accuracy and eval/loss."""
  finished = table[table["status"] == "finished"]
  present = [m for m in ("eval/bits_per_byte", "eval/accuracy", "eval/loss")
             if m in finished and finished[m].notna().any()]
  return present[:1] if "eval/bits_per_byte" in present else present


def report_sentences(table: pd.DataFrame, summary: pd.DataFrame, speed: pd.DataFrame,
                     metrics: Sequence[str]) -> List[str]:
  """The report's answer, in Markdown sentences: what finished and the baseline; each group
  against the baseline on `metrics` (compare.sentences) and in tokens/s
  (compare.speed_sentences), or one sentence saying why speed is not compared (`report_warnings`
  has the contended and unfinished members). table: sweep_table; summary: sweep.summarize;
  speed: sweep.relative_speed."""
  finished = table[table["status"] == "finished"]
  baseline = summary["baseline"].iloc[0]
  lines = [f"{len(finished)} of {len(table)} members finished, in "
           f"{finished['group'].nunique()} groups; every group is compared with "
           f"**{baseline}**, with 95% intervals over seeds, paired by seed."]
  # The groups whose speed counts: a finished member, not contended, with tokens/s logged.
  timed = set(finished.loc[~finished["contended"] & finished["tokens_per_s"].notna(), "group"])
  others = [group for group in dict.fromkeys(finished["group"]) if group != baseline]
  for group in others:
    lines += compare.sentences(summary[summary["group"] == group], metrics)
    if baseline in timed:
      lines += (compare.speed_sentences(speed[speed["group"] == group])
                or [f"No speed for {group}: its members all ran contended (warnings below)."])
  if others and not timed:
    lines.append(f"Speed is not compared: all {len(finished)} finished members ran contended "
                 f"(their CPU share far from the sweep's median; warnings below), so their "
                 f"tokens/s measure the machine, not the router." if finished["contended"].all()
                 else "Speed is not compared: no finished member logged its tokens/s.")
  elif others and baseline not in timed:
    lines.append(f"Speed is not compared: every member of the baseline {baseline} ran "
                 f"contended (warnings below).")
  return lines


def report_warnings(table: pd.DataFrame) -> str:
  """The report's warnings as HTML, folded under one line that counts them: the contended
  members (sweep.contention_warnings) and those that did not finish, with their error; '' when
  there are none. table: sweep_table."""
  contended = sweep.contention_warnings(table)
  unfinished = table[table["status"] != "finished"]
  items = list(map(html.escape, contended))
  items += [f"Not finished: <code>{html.escape(row.name)}</code> ({row.status}"
            + (f": <code>{html.escape(row.error)}</code>)" if row.error else ")")
            for row in unfinished.itertuples(index=False)]
  if not items:
    return ""
  counts = []
  if contended:
    counts.append(f"{len(contended)} member{'s' if len(contended) > 1 else ''} ran contended")
  if len(unfinished):
    counts.append(f"{len(unfinished)} did not finish")
  return (f"<details><summary>Warnings: {', '.join(counts)}</summary><ul>"
          + "".join(f"<li>{item}</li>" for item in items) + "</ul></details>")


def comparison_table(table: pd.DataFrame, summary: pd.DataFrame, speed: pd.DataFrame,
                     metrics: Sequence[str]) -> pd.DataFrame:
  """The report's comparison table: one row per group (the index, in sweep order), every cell
  a string with numbers to 3 significant figures (compare.significant).

  table: sweep_table; summary: sweep.summarize; speed: sweep.relative_speed; metrics: the
  quality metrics shown (quality_metrics). Columns, two levels:
    ("", "seeds")                     finished members
    (metric name, "mean [95% CI]")    for each metric; then "vs <baseline>" (the paired
                                      difference with its interval) and "verdict"
    ("tokens/s", "mean")              the group's mean of its members' steady-state medians;
                                      then "x <baseline>" (compare.ratios) and "verdict"
                                      (faster, slower, ...); contended members left out
    ("", "dropped")                   mean dropped fraction ('-' for a dense group)
  """
  baseline = summary["baseline"].iloc[0]
  finished = table[table["status"] == "finished"]
  groups = list(dict.fromkeys(table["group"]))
  rows = {(row.group, row.metric): row for row in summary.itertuples(index=False)}
  ratios = {row.group: row for row in speed.itertuples(index=False)}
  columns = {("", "seeds"): [str((finished["group"] == group).sum()) for group in groups]}
  for metric in metrics:
    cells = [rows[group, metric] for group in groups]
    name = compare.metric_name(metric)
    columns[name, "mean [95% CI]"] = [compare.format_interval(row.mean, row.ci_low, row.ci_high)
                                      for row in cells]
    columns[name, f"vs {baseline}"] = list(map(compare.difference_text, cells))
    columns[name, "verdict"] = list(map(compare.verdict_text, cells))
  if ratios:  # tokens_per_s measured
    columns["tokens/s", "mean"] = [compare.significant(rows[group, "tokens_per_s"].mean)
                                   for group in groups]
    columns["tokens/s", f"x {baseline}"] = [compare.ratio_text(ratios[group]) for group in groups]
    columns["tokens/s", "verdict"] = [compare.verdict_text(ratios[group], compare.SPEED_VERDICTS)
                                      for group in groups]
  dropped = finished.groupby("group")["dropped_fraction"].mean()
  columns["", "dropped"] = [compare.significant(dropped.get(group, math.nan)) for group in groups]
  return pd.DataFrame(columns, index=pd.Index(groups, name="group"))


def table_html(frame: pd.DataFrame) -> str:
  """A table of strings (comparison_table) as HTML, each interval kept whole: a narrow column
  wraps a cell between its mean and '[low, high]', never inside the brackets. Set closer and
  smaller than the notebook's tables, so that two metrics and the speed fit a page's width (at
  the notebook's 12px with 0.5em padding, the last columns ran off it)."""
  def whole(text: str) -> str:
    return re.sub(r"\[[^\]]*\]", lambda m: m[0].replace(" ", "\N{NO-BREAK SPACE}"), text)

  style = ("<style>table.report td, table.report th {padding: 0.3em 0.4em; font-size: 11px}"
           "</style>")
  return style + frame.map(whole).rename(columns=whole).to_html(index_names=False,
                                                                 classes="report")


def group_loss_curves(table: pd.DataFrame) -> pd.DataFrame:
  """The loss curves (loss_curves' task cross-entropy) of each group's finished members, over
  seeds, per split and step.

  table: sweep_table. Returns columns group, split, step, seeds (members logged at that step),
  mean, low and high (the lowest and highest member), groups in sweep order.
  """
  finished = table[table["status"] == "finished"]
  curves = [loss_curves(run_dir).assign(group=group)
            for run_dir, group in zip(finished["run_dir"], finished["group"])]
  if not curves:
    return pd.DataFrame(columns=["group", "split", "step", "seeds", "mean", "low", "high"])
  return (pd.concat(curves).groupby(["group", "split", "step"], sort=False)["loss"]
          .agg(seeds="count", mean="mean", low="min", high="max").reset_index())


def eval_table(curves: pd.DataFrame) -> pd.DataFrame:
  """group_loss_curves' evaluations as a table of strings, for a sweep evaluated too rarely to
  draw: one row per group, one column per evaluated step, each cell the mean over seeds with
  the lowest and highest seed, '1.53 (1.52 to 1.54)' (the mean alone for one seed)."""
  evals = curves[curves["split"] == "eval"]

  def cell(row) -> str:
    spread = (f" ({compare.significant(row.low)} to {compare.significant(row.high)})"
              if row.seeds > 1 else "")
    return compare.significant(row.mean) + spread

  cells = evals.assign(cell=[cell(row) for row in evals.itertuples(index=False)])
  frame = cells.pivot(index="group", columns="step", values="cell").fillna("-")
  frame = frame.loc[list(dict.fromkeys(evals["group"]))]
  return frame.rename(columns=lambda step: f"step {step}").rename_axis(index=None, columns=None)


def spans_decades(values: Sequence[float]) -> bool:
  """Whether values to plot are positive and span a factor of 10 or more: then a log axis shows
  them all (on a linear one the small ones sit on the floor)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return bool(len(values)) and values.min() > 0 and values.max() >= 10 * values.min()


def dodge(values: Sequence[float], spacing: float, tolerance: float = 0.02) -> np.ndarray:
  """Sideways offsets (in units of `spacing`, say points on the page) for markers at `values`
  (on the axis' scale: take logs for a log axis), so that those closer than `tolerance` of the
  values' span, or of their size when they are all equal, sit side by side instead of on top of
  each other. Each cluster is centred on its value; a lone marker keeps offset 0."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  span = np.ptp(values) or abs(values).max() or 1.0
  offsets = np.zeros(len(values))
  clusters = np.split(order, np.flatnonzero(np.diff(values[order]) > tolerance * span) + 1)
  for cluster in clusters:
    offsets[cluster] = (np.arange(len(cluster)) - (len(cluster) - 1) / 2) * spacing
  return offsets
