"""Routing trace and replay: each MoE layer's decisions at chosen train steps, on disk.

Trace (train.trace_steps, train.trace_every): the loop runs those steps with a variant of the
train step that also returns what every MoE layer routed (MoeLayer records it in the
routers.TRACE collection of the step's own forward pass; the other steps run the plain step),
and writes <workdir>/trace/step_<n>.npz (compressed), arrays named by the layer's path:
  <layer>/choices  [G,S,K] int8 (int16 for E > 127): the router's choices before capacity, E for
                   none (padding, GShard's removed 2nd choice, top_p's unused ones)
  <layer>/kept     [G,S,K] bool: the choice got a slot (was processed)
  <layer>/gates    [G,S,K] float32 combine weights, 0 where not kept (train.trace_gates only)
  microbatches     []: the step's train.microbatches n
Group g holds tokens g S .. (g + 1) S - 1 of the batch, flattened example by example; with n > 1
the groups are micro-batch 0's, then micro-batch 1's, ... (micro-batch i: examples i, i + n, ...).
analysis.routing_trace reads a trace as routing_decisions' frame.

Replay (train.replay_from: a trace directory, or a run directory holding trace/): each step
routes by the trace of the same step. The routers still compute their probabilities (gates,
losses, statistics); the experts come from the trace (routing.tokens_choose's `replay`), so a
run replaying its own trace reaches the same losses, and any run can be held to recorded routing
(Megatron's moe_enable_routing_replay).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from moe_jax.validation import ConfigError
from moe_jax.layers import MoeLayer

TRACE_DIR = "trace"
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


def is_traced(t, step: int) -> bool:
  """Whether config.train `t` traces train step `step` (1-based)."""
  return step in t.trace_steps or (t.trace_every > 0 and step % t.trace_every == 0)


def trace_directory(source: str) -> str:
  """The directory of step files: `source`/trace for a run directory, else `source`."""
  run_trace = os.path.join(source, TRACE_DIR)
  return run_trace if os.path.isdir(run_trace) else source


def traced_steps(source: str) -> List[int]:
  """The steps `source` (a trace or run directory) holds a trace of, ascending."""
  directory = trace_directory(source)
  if not os.path.isdir(directory):
    return []
  return sorted(int(m[1]) for name in os.listdir(directory) if (m := _STEP_FILE.match(name)))


def write(workdir: str, step: int, arrays: Dict[str, np.ndarray], microbatches: int) -> str:
  """Writes the trace of `step` (arrays: '<layer>/<name>' -> array); returns its path. The file
  appears whole (written aside, then renamed), so a killed run leaves no partial trace."""
  directory = os.path.join(workdir, TRACE_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"step_{step}.npz")
  with open(path + ".tmp", "wb") as f:
    np.savez_compressed(f, microbatches=np.int32(microbatches), **arrays)
  os.replace(path + ".tmp", path)
  return path


def read(source: str, step: int) -> Tuple[int, Dict[str, Dict[str, np.ndarray]]]:
  """The trace of `step` in `source`: (microbatches, {layer path: {'choices', 'kept' and, if
  traced, 'gates'}})."""
  path = os.path.join(trace_directory(source), f"step_{step}.npz")
  with np.load(path) as stored:
    layers: Dict[str, Dict[str, np.ndarray]] = {}
    for key in stored.files:
      if key != "microbatches":
        layer, name = key.rsplit("/", 1)
        layers.setdefault(layer, {})[name] = stored[key]
    return int(stored["microbatches"]), layers


def expected_choices(config, tokens_per_example: int,
                     moe_layers: Dict[int, MoeLayer]) -> Dict[str, Tuple[Tuple[int, ...], int]]:
  """{layer path: ([G,S,K] of its choices in a train step, E)} for the run `config` and its MoE
  layers (models.layer_plan(...).moe_layers())."""
  t = config.train
  tokens = t.batch_size // t.microbatches * tokens_per_example  # a micro-batch's
  shapes = {}
  for index, layer in moe_layers.items():
    group_size = min(layer.resolved_group_size(tokens), tokens)
    shape = (t.microbatches * math.ceil(tokens / group_size), group_size, layer.num_selected)
    shapes[f"block_{index}/moe"] = shape, layer.num_experts
  return shapes


def _spans(steps: Sequence[int]) -> str:
  """'1-3, 7' for [1, 2, 3, 7]."""
  spans: List[List[int]] = []
  for step in steps:
    if spans and step == spans[-1][1] + 1:
      spans[-1][1] = step
    else:
      spans.append([step, step])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_replay(source: str, steps: range, expected, microbatches: int) -> None:
  """ConfigError (one line) unless `source` holds a trace of every step in `steps` whose layers
  match `expected` (expected_choices); the first step's file is read."""
  field = f"config.train.replay_from={source!r}"
  if not os.path.isdir(source):
    raise ConfigError(f"{field} is not a directory")
  have = traced_steps(source)
  missing = sorted(set(steps) - set(have))
  if missing:
    raise ConfigError(f"{field} has no trace of steps {_spans(missing)} (the run's steps "
                      f"{steps.start}-{steps.stop - 1}; traced: {_spans(have) or 'none'})")
  if steps:
    load_replay(source, steps.start, expected, microbatches)


def load_replay(source: str, step: int, expected, microbatches: int) -> Dict[str, np.ndarray]:
  """{layer path: [G,S,K] choices} of `step` for the train step's replay; ConfigError when
  they do not fit the run (expected: expected_choices)."""
  field = f"config.train.replay_from={source!r}"
  try:
    traced_microbatches, layers = read(source, step)
  except Exception as error:  # a damaged file: numpy and zipfile raise many types
    path = os.path.join(trace_directory(source), f"step_{step}.npz")
    reason = " ".join(str(error).split()).split(". ")[0].rstrip(".")  # its first sentence
    raise ConfigError(f"{field}: {path} is not a readable trace ({type(error).__name__}: "
                      f"{reason}); trace step {step} again") from error
  if traced_microbatches != microbatches:
    raise ConfigError(f"{field}: step {step} was traced with train.microbatches="
                      f"{traced_microbatches}, this run has {microbatches}")
  if sorted(layers) != sorted(expected):
    raise ConfigError(f"{field}: step {step} traced the MoE layers {sorted(layers)}; this "
                      f"model has {sorted(expected)}")
  for layer, (shape, num_experts) in expected.items():
    choices = layers[layer]["choices"]
    if choices.shape != shape or choices.min() < 0 or choices.max() > num_experts:
      raise ConfigError(f"{field}: step {step}'s {layer} choices are [G,S,K] = "
                        f"{list(choices.shape)} in [{choices.min()}, {choices.max()}]; this run "
                        f"routes {list(shape)} over {num_experts} experts")
  return {layer: layers[layer]["choices"] for layer in expected}
