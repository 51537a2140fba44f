"""Expert-load monitoring: load percentiles, dead and collapsed experts, on hand-made records."""
import numpy as np
import pytest

from moe_jax.monitor import LoadMonitor

KEY = "train/routing/block_1/moe/expert_load"


def test_load_distribution_as_multiples_of_the_mean_by_hand():
  metrics, warnings = LoadMonitor().update({KEY: [0.4, 0.3, 0.2, 0.1], "train/loss": 1.0})
  prefix = "train/routing/block_1/moe/"
  assert metrics[prefix + "load_min"] == pytest.approx(0.4)  # 0.1 x 4 experts
  assert metrics[prefix + "load_max"] == pytest.approx(1.6)
  assert metrics[prefix + "load_p50"] == pytest.approx(1.0)  # between 0.8 and 1.2
  assert metrics[prefix + "load_p10"] == pytest.approx(np.percentile([.4, .8, 1.2, 1.6], 10))
  assert (metrics[prefix + "top_expert"], metrics[prefix + "bottom_expert"]) == (0, 3)
  assert metrics[prefix + "dead_experts"] == 0 and metrics[prefix + "collapsed"] == 0
  assert warnings == []


def test_dead_experts_are_named_once_after_patience_records_in_a_row():
  monitor = LoadMonitor(dead_load=0.1, patience=3)
  alive = [0.25, 0.25, 0.25, 0.25]
  dead = [0.33, 0.33, 0.335, 0.005]  # expert 3 at 0.02x the mean
  outputs = [monitor.update({KEY: load}) for load in (dead, dead, alive, dead, dead, dead, dead)]
  counts = [m["train/routing/block_1/moe/dead_experts"] for m, _ in outputs]
  assert counts == [0, 0, 0, 0, 0, 1, 1]  # the alive record restarts the count
  assert [w for _, w in outputs] == [[]] * 5 + [[
      "block_1/moe: 1 of 4 experts dead (load under 0.1x the mean for 3 records): experts 3"],
      []]


def test_a_collapsed_router_is_flagged_and_warned():
  monitor = LoadMonitor(collapse_share=0.5, patience=2)
  collapsed = [0.7, 0.1, 0.1, 0.1]
  outputs = [monitor.update({KEY: collapsed}) for _ in range(3)]
  assert [m["train/routing/block_1/moe/collapsed"] for m, _ in outputs] == [0, 1, 1]
  assert outputs[1][1] == ["block_1/moe: routing collapsed: expert 0 holds 70% of the choices "
                           "for 2 records"]
  assert outputs[2][1] == []
