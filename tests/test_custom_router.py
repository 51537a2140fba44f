"""Routers defined outside moe_jax/: examples/temperature_router.py (its math, its settings'
validation, and a sweep that trains it end to end with statistics, report and analysis) and
examples/centroid_router.py (state from the tokens and the decision, its own statistic and loss,
a file that is also its config; the router_module paths)."""
import importlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from configs import common
from moe_jax import analysis, compare, routers
from moe_jax import config as config_lib
from moe_jax import sweep as sweep_lib
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


# ----------------------------------------------------------------------------------------------
# examples/centroid_router.py: state updated from the tokens and the decision, its own statistic
# and loss, and a file that is also its config.

CENTROID = dict(num_experts=4, expert_hidden_dim=8, router="centroid", group_size=12,
                capacity_factor=4.0, router_settings={"dim": 3, "decay": 0.5, "temperature": 0.5})


def unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_centroid_router_by_numpy_state_statistic_and_loss():
  importlib.import_module("examples.centroid_router")
  x = jax.random.normal(jax.random.key(0), (12, 6))
  layer = MoeLayer(**CENTROID)
  init = lambda seed: nn.meta.unbox(layer.init({"params": jax.random.key(seed)}, x,
                                               deterministic=True))
  variables = {key: init(1)[key] for key in ("params", routers.STATE)}
  centroids = lambda v: np.asarray(v[routers.STATE]["router"]["centroids"], np.float64)
  # the state's initializer draws from the 'params' rng
  assert centroids(variables).shape == (4, 3)
  assert not np.allclose(centroids(variables), centroids(init(2)))
  np.testing.assert_array_equal(centroids(variables), centroids(init(1)))

  mutable = MUTABLE + [routers.STATE]
  _, state = layer.apply(variables, x, deterministic=False, mutable=mutable)
  kernel = np.asarray(variables["params"]["router"]["projection"], np.float64)
  h, c = unit(np.asarray(x, np.float64) @ kernel), unit(centroids(variables))
  cosine = h @ c.T
  logits = cosine / 0.5
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  chosen = np.zeros((12, 4))
  np.put_along_axis(chosen, np.argsort(-probs, -1)[:, :2], 1, -1)
  losses = state["losses"]
  assert float(losses["router"]["commitment_loss"][0]) == pytest.approx(
      np.sum(chosen * (2 - 2 * cosine)) / 24, rel=1e-5)
  counts = chosen.sum(0)
  mean = chosen.T @ h / np.maximum(counts, 1)[:, None]
  expected = np.where(counts[:, None] > 0, 0.5 * centroids(variables) + 0.5 * mean,
                      centroids(variables))
  np.testing.assert_allclose(centroids(state), expected, atol=1e-6)
  moved = unit(expected) @ unit(expected).T
  assert float(state["routing_stats"]["stats"][0]["centroid_similarity"]) == pytest.approx(
      (moved.sum() - np.trace(moved)) / 12, abs=1e-6)
  np.testing.assert_allclose(state["routing_stats"]["stats"][0]["expert_load"], counts / 24)

  # evaluation routes by the state and moves nothing
  _, evaluated = layer.apply(variables, x, deterministic=True, mutable=mutable)
  assert routers.STATE not in evaluated or np.array_equal(centroids(evaluated),
                                                          centroids(variables))
  # the commitment loss trains the projection; the centroids are state, never differentiated
  loss = lambda params: layer.apply({**variables, "params": params}, x, deterministic=False,
                                    mutable=mutable)[1]["losses"]["router"]["commitment_loss"][0]
  assert np.abs(jax.grad(loss)(variables["params"])["router"]["projection"]).max() > 0


def test_a_loss_a_router_does_not_declare_is_refused():
  class Undeclared(routers.TopKRouter):
    def route(self, logits, **kwargs):
      self.add_loss("commitment_loss", 0.0)
      return super().route(logits, **kwargs)

  with pytest.raises(ValueError, match=r"^Undeclared.add_loss\('commitment_loss'\): its losses "
                                       r"\(Router.losses\) are none\n"):
    Undeclared(num_experts=4, k=2).init(jax.random.key(0), jnp.ones((1, 4, 3)), capacity=None)


def test_a_router_file_that_is_also_its_config_is_imported_once():
  config = config_lib.load_config(["--config=examples/centroid_router.py",
                                   "--config.model.moe.centroid.dim=8"])
  assert config.model.moe.router == "centroid" and config.model.moe.centroid.dim == 8
  assert routers.get("centroid").__module__ == "config_config"  # the --config file's module
  config_lib.validate(config, tokens_per_example=50)  # imports router_module: the same file
  assert sys.modules["examples.centroid_router"] is sys.modules["config_config"]
  assert routers.get("centroid").__module__ == "config_config"


def test_config_arg_and_overrides_name_a_router_that_router_module_registers():
  config = config_lib.load_config([
      "--config=configs/vit.py:centroid",
      "--config.model.moe.router_module=examples.centroid_router",
      "--config.model.moe.centroid.decay=0.5", "--config.train.commitment_loss_weight=0.2"])
  moe = config.model.moe
  assert (moe.router, moe.centroid.decay, moe.centroid.dim) == ("centroid", 0.5, 16)
  assert config.train.commitment_loss_weight == 0.2
  assert moe.expert_hidden_dim == config.model.mlp_dim // 2  # top-2 at the dense FLOPs
  with pytest.raises(config_lib.ConfigError, match=r"^model.moe.router_module='examples.nowhere' "
                                                   r"does not import: No module named"):
    config_lib.load_config(["--config=configs/vit.py",
                            "--config.model.moe.router_module=examples.nowhere"])


def test_validate_adds_the_settings_block_and_loss_weight_of_router_module():
  config = config_lib.default_config()  # built before the router was registered
  assert "centroid" not in config.model.moe
  config.model.moe.router, config.model.moe.router_module = "centroid", "examples.centroid_router"
  config.lock()
  config_lib.validate(config, tokens_per_example=50)
  assert config.model.moe.centroid.to_dict() == routers.get("centroid").settings()
  assert config.train.commitment_loss_weight == 1e-2
  assert "centroid" in json.loads(config.to_json_best_effort())["model"]["moe"]  # saved


def test_the_zoo_takes_in_the_routers_of_router_module(tmp_path):
  assert "centroid" not in common.zoo()
  zoo = common.zoo("examples.centroid_router")
  assert zoo[-4:] == ("centroid", "deepseek", "residual", "mod")
  path = tmp_path / "my_zoo.py"  # a sweep file of one's own, as configs/sweeps/zoo.py says
  path.write_text("from configs.sweeps import zoo\n\n\ndef get_sweep():\n"
                  "  return zoo.get_sweep('examples.centroid_router')\n")
  definition = sweep_lib.load_sweep(str(path))
  assert definition["fixed"]["model.moe.router_module"] == "examples.centroid_router"
  members = [m for m in sweep_lib.expand(definition, str(tmp_path / "runs"))
             if m["overrides"]["config_arg"] == "centroid"]
  assert len(members) == 3  # seeds
  assert sweep_lib.check_members(members[:1]) == {}


def test_the_centroid_router_trains_from_its_file_with_micro_batches(tmp_path):
  workdir = tmp_path / "run"
  overrides = {**TINY, "train.num_steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
               "train.microbatches": 2, "model.moe.centroid.decay": 0.9,
               "train.commitment_loss_weight": 0.5}
  done = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=examples/centroid_router.py",
       f"--workdir={workdir}", *(f"--config.{key}={value}" for key, value in overrides.items())],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": FAST_COMPILE})
  assert done.returncode == 0, done.stdout + done.stderr
  saved = json.load(open(workdir / "config.json"))
  assert saved["model"]["moe"]["centroid"]["decay"] == 0.9
  assert saved["train"]["commitment_loss_weight"] == 0.5
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  for r in (r for r in records if "train/loss" in r):  # each loss under its own weight
    assert r["train/loss"] == pytest.approx(
        r["train/task_loss"] + 0.5 * r["train/commitment_loss"]
        + 1e-2 * r["train/load_balance_loss"] + 1e-3 * r["train/z_loss"], rel=1e-5)
    assert r["train/commitment_loss"] > 0
    assert -1 <= r["train/routing/block_1/moe/centroid_similarity"] <= 1
  state = analysis.restore_variables(workdir, 4)[routers.STATE]["block_1"]["moe"]["router"]
  assert state["centroids"].shape == (8, 16)
  # Its statistic, with the direction it declares, reaches the sweep's columns and comparisons.
  final = json.load(open(workdir / "final_metrics.json"))
  assert final["router_statistics"] == {"centroid_similarity": -1}
  row = sweep_lib.member_results(str(workdir))
  assert row["centroid_similarity"] == pytest.approx(
      final["train"]["train/routing/block_1/moe/centroid_similarity"])
  with registered_routers():
    routers.import_module("examples.centroid_router")
    assert compare.direction("centroid_similarity") == -1
