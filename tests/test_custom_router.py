"""A router defined outside moe_jax/ (examples/temperature_router.py): its math, its settings'
validation, and a sweep that trains it end to end with statistics, report and analysis."""
import importlib
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pandas as pd
import pytest

from moe_jax import analysis, routers
from moe_jax.layers import MoeLayer
from tests.conftest import FAST_COMPILE, registered_routers
from tests.test_sweep import ROOT, TINY, write_sweep

MUTABLE = ["losses", "routing_stats"]


@pytest.fixture(autouse=True)
def temperature_router():
  """'temperature' registered for the test only (tests/conftest.registered_routers)."""
  with registered_routers():
    importlib.import_module("examples.temperature_router")
    yield


def test_registered_router_is_top_k_of_the_tempered_softmax_by_numpy():
  assert "temperature" in routers.names()
  assert routers.get("temperature").settings()["init_temperature"] == 1.0
  x = jax.random.normal(jax.random.key(0), (12, 6))
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="temperature", group_size=12,
                   capacity_factor=4.0, router_settings={"init_temperature": 2.0})
  params = nn.meta.unbox(layer.init({"params": jax.random.key(1)}, x, deterministic=True))
  params = params["params"]
  y, state = layer.apply({"params": params}, x, deterministic=True, mutable=MUTABLE)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  assert p["router"]["log_temperature"] == pytest.approx(np.log(2.0))
  logits = np.asarray(x, np.float64) @ p["router"]["logits"]["kernel"] / 2.0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = np.zeros(x.shape)
  for t in range(12):
    chosen = np.argsort(-probs[t])[:2]
    for e in chosen:
      hidden = np.asarray(jax.nn.gelu(np.asarray(x[t], np.float64) @ p["experts"]["wi"][e]))
      expected[t] += probs[t, e] / probs[t, chosen].sum() * (hidden @ p["experts"]["wo"][e])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  counts = np.bincount(np.argsort(-probs, -1)[:, :2].ravel(), minlength=4)
  np.testing.assert_allclose(state["routing_stats"]["stats"][0]["expert_load"], counts / 24)
  # the temperature learns: the load-balancing loss depends on it
  loss = lambda params: layer.apply({"params": params}, x, mutable=MUTABLE)[1]["losses"][
      "load_balance_loss"][0]
  assert abs(float(jax.grad(loss)(params)["router"]["log_temperature"])) > 0


def test_its_settings_are_validated_with_one_line_errors():
  with pytest.raises(ValueError, match=r"^MoeLayer.temperature.init_temperature=0.0 must be "
                                       r"> 0$"):
    MoeLayer(num_experts=4, expert_hidden_dim=8, router="temperature",
             router_settings={"init_temperature": 0.0})
  with pytest.raises(ValueError, match=r"^MoeLayer.temperature.scores is not a setting of "
                                       r"router='temperature'; its settings: 'score_function', "
                                       r"'renormalize', 'scaling_factor', 'num_expert_groups', "
                                       r"'top_expert_groups', 'group_score_experts', "
                                       r"'group_score_input', 'balance_per_k', 'drop_policy', "
                                       r"'drop_rank', 'priority', 'init_temperature'$"):
    MoeLayer(num_experts=4, expert_hidden_dim=8, router="temperature",
             router_settings={"scores": "sigmoid"})
  with pytest.raises(ValueError, match="^router name 'temperature' is taken by "
                                       "examples.temperature_router.TemperatureRouter$"):
    routers.register("temperature")(type("Other", (routers.TopKRouter,), {}))


def test_a_router_from_outside_moe_jax_trains_in_a_sweep_with_report_and_analysis(
    tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # members train on one CPU device
  path = write_sweep(tmp_path, {
      "base": "configs/vit_temperature.py", "fixed": TINY,
      "members": [{"model.moe.temperature.init_temperature": 0.5}]})
  workdir = tmp_path / "runs"
  done = subprocess.run([sys.executable, "-m", "experiments.sweep", "--sweep", path,
                         "--workdir", str(workdir), "--report"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  results = pd.read_csv(workdir / "results.csv")
  member = workdir / results["name"].iloc[0]
  assert list(results["status"]) == ["finished"]
  final = json.load(open(member / "final_metrics.json"))
  for stat in ("dropped_fraction", "load_cv", "max_violation", "max_logit"):
    assert results[stat].iloc[0] == pytest.approx(
        final["train"][f"train/routing/block_1/moe/{stat}"])
  assert 0 < results["eval/accuracy"].iloc[0] <= 1
  assert "temperature" in (workdir / "report.html").read_text()

  # The run's saved config names the router's module: analysis loads it without the config file.
  run = analysis.load_run(member)
  assert run.config.model.moe.router == "temperature"
  assert run.config.model.moe.temperature.init_temperature == 0.5
  decisions = analysis.routing_decisions(member)
  assert set(decisions["router"]) == {"temperature"} and set(decisions["layer"]) == {1}
  assert (decisions["experts"].map(len) == 2).all()  # top-2
  load = analysis.expert_load(member)
  assert set(load["layer"]) == {1}
