"""Expert-load monitoring during training: the distribution of each MoE layer's load, and dead
and collapsed experts named in the log and the metrics.

Each train record holds, per MoE layer, expert_load [E]: each expert's share of the router's
choices, averaged over the steps since the previous record (metrics.routing_statistics). From it
`LoadMonitor.update` adds to the record, per layer (prefix train/routing/<layer>/):
  load_min, load_p10, load_p50, load_p90, load_max   the load as a multiple of the mean 1 / E
  top_expert, bottom_expert                          the most and the least loaded expert
  dead_experts                                       experts under dead_load x the mean for
                                                     `patience` records in a row
  collapsed                                          1 when one expert has held over
                                                     collapse_share of the choices for `patience`
                                                     records in a row, else 0
so that a 64-expert layer logs a handful of numbers rather than 64 per record, and returns one
warning line per layer where experts die or the routing collapses (printed by the train loop).
The counts start again when a run resumes. With gradient accumulation (train.microbatches) the
record's max_violation is the MaxVio of each step's whole batch, and micro_batch_max_violation
the mean of its micro-batches' own (train.make_steps).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

__all__ = ["LoadMonitor"]

PERCENTILES = (10, 50, 90)
SUFFIX = "/expert_load"


class LoadMonitor:
  """Per-layer counts of records in a row with dead experts or a collapsed router.

  Attributes:
    dead_load: an expert is dead in a record when its load is under dead_load x the mean load.
    collapse_share: the routing has collapsed in a record when one expert holds more than this
      share of the choices.
    patience: records in a row before an expert counts as dead or the layer as collapsed.
  """

  def __init__(self, dead_load: float = 0.1, collapse_share: float = 0.5, patience: int = 3):
    self.dead_load, self.collapse_share, self.patience = dead_load, collapse_share, patience
    self.low_records: Dict[str, np.ndarray] = {}  # layer -> [E] records in a row under dead_load
    self.collapsed_records: Dict[str, int] = {}

  def update(self, record: Dict[str, Any]) -> Tuple[Dict[str, float], List[str]]:
    """(metrics to add to the train record, warning lines) for one train record."""
    metrics, warnings = {}, []
    for key in sorted(k for k in record if k.startswith("train/routing/") and k.endswith(SUFFIX)):
      layer = key[len("train/routing/"):-len(SUFFIX)]
      load = np.asarray(record[key], np.float64)
      ratio = load * load.size  # multiples of the mean load 1 / E
      prefix = f"train/routing/{layer}/"
      metrics.update({prefix + "load_min": float(ratio.min()),
                      prefix + "load_max": float(ratio.max()),
                      prefix + "top_expert": int(np.argmax(load)),
                      prefix + "bottom_expert": int(np.argmin(load))})
      for q, value in zip(PERCENTILES, np.percentile(ratio, PERCENTILES)):
        metrics[prefix + f"load_p{q}"] = float(value)
      low = self.low_records.get(layer, np.zeros(load.size, int))
      low = np.where(ratio < self.dead_load, low + 1, 0)
      self.low_records[layer] = low
      dead = np.flatnonzero(low >= self.patience)
      metrics[prefix + "dead_experts"] = int(dead.size)
      over = load.max() > self.collapse_share
      collapsed = self.collapsed_records.get(layer, 0) + 1 if over else 0
      self.collapsed_records[layer] = collapsed
      metrics[prefix + "collapsed"] = int(collapsed >= self.patience)
      if dead.size and (low[dead] == self.patience).any():  # newly dead: say so once
        warnings.append(f"{layer}: {dead.size} of {load.size} experts dead (load under "
                        f"{self.dead_load:g}x the mean for {self.patience} records): experts "
                        f"{', '.join(map(str, dead[:8]))}{' ...' if dead.size > 8 else ''}")
      if collapsed == self.patience:
        warnings.append(f"{layer}: routing collapsed: expert {int(np.argmax(load))} holds "
                        f"{load.max():.0%} of the choices for {self.patience} records")
    return metrics, warnings
