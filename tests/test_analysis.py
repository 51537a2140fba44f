"""Run analysis on real tiny runs: the frames from metrics.jsonl, routing decisions checked against
the model's own routing, and the specialization / consistency / transition / coverage math by
hand."""
import functools
import itertools
import json
import math

import flax.linen as nn
import jax
import numpy as np
import pandas as pd
import pytest

from configs import common
from moe_jax import analysis, data, models, routing, trace, train
from tests.conftest import shared_dir

TOKENS = 32 * 50  # one eval batch: 32 images of 49 patches + the class token


def tiny(config, steps=20):
  """A shipped config shrunk to train in seconds: 2 MoE layers (every=1), width 32."""
  config.model.num_layers = 2
  config.model.width = 32
  config.model.num_heads = 2
  config.train.batch_size = 32
  config.train.num_steps = steps
  config.train.warmup_steps = 2
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.eval_max_batches = 1
  config.train.checkpoint_every = 10
  config.model.moe.every = 1  # (a dense model ignores it)
  return config


def run_configs():
  """The configs of the `runs` fixture: a tiny ViT per router (every kind of decision: top-k,
  expert choice, fixed, biased top-k, soft), plus a 2-step byte LM ('lm'). loss_free traces its
  routing at every step, in 2 micro-batches."""
  lm = tiny(common.lm("topk"), steps=2)
  lm.data.seq_len = lm.model.moe.group_size = 32
  lm.train.batch_size = 8
  lm.train.warmup_steps = 1
  configs = {router: tiny(common.vit(router))
             for router in ("switch", "expert_choice", "hash", "random", "loss_free", "soft")}
  configs["loss_free"].model.moe.loss_free.bias_update_rate = 0.05  # a bias that changes decisions
  configs["loss_free"].train.update(trace_every=1, trace_gates=True, microbatches=2)
  configs["loss_free"].model.moe.group_size = 100  # 8 groups a micro-batch, one per batch shard
  configs["lm"] = lm
  return configs


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """Run directories of run_configs(); trained once."""
  configs = run_configs()
  with shared_dir(tmp_path_factory, "analysis_runs") as root:
    for name, config in configs.items():
      if not (root / name / "final_metrics.json").exists():
        train.train_and_evaluate(config, str(root / name))
  return {name: str(root / name) for name in configs}


@pytest.fixture(scope="session")
def decisions(runs):
  return {name: analysis.routing_decisions(run_dir) for name, run_dir in runs.items()}


def hand_mi(x, y):
  """MI by H(X) + H(Y) - H(X, Y) from two label sequences (not the code's formula)."""
  def h(*columns):
    p = pd.Series(list(zip(*columns))).value_counts(normalize=True).to_numpy()
    return -(p * np.log(p)).sum()

  return h(x) + h(y) - h(x, y)


def test_mutual_information_and_entropy_by_hand():
  assert analysis.mutual_information([[5, 5], [5, 5]]) == pytest.approx(0.0, abs=1e-12)
  assert analysis.mutual_information([[2, 0], [0, 2]]) == pytest.approx(math.log(2))
  # p = [[3, 1], [1, 3]] / 8, marginals 1/2: 2 * 3/8 ln(3/2) + 2 * 1/8 ln(1/2)
  assert analysis.mutual_information([[3, 1], [1, 3]]) == pytest.approx(
      0.75 * math.log(1.5) + 0.25 * math.log(0.5))
  # H(Y) - H(Y|X) = 1.5 ln 2 - 0.5 ln 2
  assert analysis.mutual_information([[2, 0, 0], [0, 1, 1]]) == pytest.approx(math.log(2))
  assert analysis.entropy([1, 1, 2, 0]) == pytest.approx(1.5 * math.log(2))

  # The same table as decisions: expert -1 (no expert) is one more value of the expert.
  frame = pd.DataFrame({"layer": 3, "router": "expert_choice", "num_experts": 2,
                        "category": list("aaaabbbbb"), "top1": [0, 0, 0, 1, 1, 1, 1, 0, -1]})
  table = analysis.class_expert_table(frame, 3)
  assert table.to_dict("index") == {"a": {-1: 0, 0: 3, 1: 1}, "b": {-1: 1, 0: 1, 1: 3}}
  spec = analysis.specialization(frame).iloc[0]
  assert spec["mi"] == pytest.approx(analysis.mutual_information([[0, 3, 1], [1, 1, 3]]))
  assert spec["mi"] == pytest.approx(hand_mi(frame["category"], frame["top1"]))
  assert spec["mi_normalized"] == pytest.approx(spec["mi"] / min(spec["h_label"],
                                                                  spec["h_expert"]))
  assert spec["tokens"] == 9


def test_byte_classes():
  got = analysis.byte_classes(np.array([ord("a"), ord("Z"), ord("7"), ord(" "), ord("\n"),
                                        ord("("), ord("_"), 0, 200]))
  assert got.tolist() == ["letter", "letter", "digit", "whitespace", "whitespace",
                          "punctuation", "punctuation", "other", "other"]


def test_metrics_frames(runs):
  for router in ("switch", "expert_choice"):
    run = analysis.load_run(runs[router])
    assert run.config.model.moe.router == router and run.final["status"] == "finished"
    assert run.checkpoint_steps == [10, 20] and sorted(run.moe_layers) == [0, 1]

    curves = analysis.loss_curves(runs[router])
    assert curves[curves.split == "train"].step.tolist() == [5, 10, 15, 20]
    last_eval = curves[curves.split == "eval"].iloc[-1]
    assert last_eval.step == 20 and last_eval.loss == run.final["eval"]["eval/loss"]
    assert (curves[curves.split == "train"].total_loss
            >= curves[curves.split == "train"].loss).all()  # aux and z losses are >= 0

    load = analysis.expert_load(runs[router])
    assert len(load) == 4 * 2 * 8  # 4 train records x 2 layers x 8 experts
    np.testing.assert_allclose(load.groupby(["step", "layer"]).load.sum(), 1.0, atol=1e-5)

    metrics = analysis.routing_metrics(runs[router])
    assert len(metrics) == 8
    np.testing.assert_allclose(metrics.entropy_max, math.log(8))
    assert (metrics.router_entropy <= metrics.entropy_max + 1e-6).all()
    assert metrics.dropped_fraction.between(0, 1).all()
    # The last record is what final_metrics.json holds.
    last = metrics[metrics.step == 20].set_index("layer")
    assert last.loc[1, "load_cv"] == run.final["train"]["train/routing/block_1/moe/load_cv"]
    assert (last.loc[1, "experts_per_token"]
            == run.final["train"]["train/routing/block_1/moe/experts_per_token"])
    assert metrics.merge_entropy.isna().all()  # SMEAR's statistic
  ec = analysis.routing_metrics(runs["expert_choice"])
  assert (ec.load_cv < 1e-6).all()  # every expert takes exactly C tokens


def test_decisions_reproduce_the_models_own_routing(runs, decisions):
  """Load, unrouted and dropped fractions from the decisions equal the routing statistics the
  model itself sows on the same evaluation batch."""
  for router in ("switch", "expert_choice", "hash", "random", "loss_free"):
    run = analysis.load_run(runs[router])
    info = data.dataset_info(run.config.data)
    batch = next(data.make_loader(run.config.data, info["eval_split"], batch_size=32, seed=0,
                                  shuffle=False, num_epochs=1, drop_remainder=False))
    model = models.get_model(run.config.model, info)
    variables = analysis.restore_variables(runs[router], 20)
    apply = jax.jit(functools.partial(model.apply, deterministic=True,
                                      mutable=["routing_stats"]))
    _, state = apply(variables, batch["image"])
    d = decisions[router]
    assert (d.step == 20).all() and len(d) == 2 * TOKENS
    for layer in (0, 1):
      stats = jax.device_get(state["routing_stats"][f"block_{layer}"]["moe"]["stats"][0])
      rows = d[d.layer == layer]
      choices = np.bincount(list(itertools.chain(*rows.experts)), minlength=8)
      np.testing.assert_allclose(choices / choices.sum(), stats["expert_load"], atol=1e-6)
      assert (rows.assigned == 0).mean() == pytest.approx(stats["unrouted_fraction"], abs=1e-6)
      dropped = 1 - rows.assigned.sum() / choices.sum()
      assert dropped == pytest.approx(stats["dropped_fraction"], abs=1e-6)
      # Tokens in order, labels those of their images.
      assert rows.token.tolist() == list(range(TOKENS))
      np.testing.assert_array_equal(rows.label, np.repeat(batch["label"], 50))
      assert rows.position.max() == 49 and rows.category.iloc[0] == info["class_names"][
          batch["label"][0]]
      # Experts by descending probability.
      assert all(list(p) == sorted(p, reverse=True) for p in rows.probs)
  switch = decisions["switch"]
  assert (switch.experts.map(len) == 1).all() and switch.assigned.isin([0, 1]).all()
  assert (switch.top1 == switch.experts.map(lambda e: e[0])).all()
  assert (switch.top1_prob == switch.probs.map(lambda p: p[0])).all()
  ec = decisions["expert_choice"]
  assert (ec.experts.map(len) == ec.assigned).all()
  assert ((ec.top1 == -1) == (ec.assigned == 0)).all()
  # Hash: each patch position's fixed bucket (ViT ids: positions 0..49), with certainty.
  hashed = decisions["hash"]
  buckets = routing.hash_buckets(50, 8)
  assert (hashed.top1 == buckets[hashed.position]).all() and (hashed.top1_prob == 1).all()
  for router in ("hash", "random"):
    assert (decisions[router].experts.map(len) == 1).all()
    assert decisions[router].assigned.isin([0, 1]).all()
  # Soft: every expert processes every token; its top-1 holds the largest combine share.
  soft = decisions["soft"]
  assert (soft.assigned == 8).all() and (soft.experts.map(len) == 1).all()
  assert soft.top1_prob.between(1 / 8, 1).all() and soft.margin.ge(0).all()


def test_loss_free_decisions_are_the_top_k_of_probability_plus_the_checkpoints_bias(
    runs, decisions):
  run = analysis.load_run(runs["loss_free"])
  info = data.dataset_info(run.config.data)
  batch = next(data.make_loader(run.config.data, info["eval_split"], batch_size=32, seed=0,
                                shuffle=False, num_epochs=1, drop_remainder=False))
  variables = analysis.restore_variables(runs["loss_free"], 20)
  model = models.get_model(run.config.model, info)
  _, state = jax.jit(functools.partial(model.apply, deterministic=True,
                                       mutable=["intermediates"]))(variables, batch["image"])
  d = decisions["loss_free"]
  changed = 0
  for layer in (0, 1):
    block = f"block_{layer}"
    logits = np.asarray(state["intermediates"][block]["moe"]["router"]["router_logits"][0],
                        np.float64).reshape(-1, 8)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    bias = np.asarray(variables[train.STATE][block]["moe"]["router"]["bias"], np.float64)
    assert np.abs(bias).max() > 0.1  # 20 steps of +-0.05
    by_bias = [set(row) for row in np.argsort(-(probs + bias), axis=1)[:, :2]]
    by_probs = [set(row) for row in np.argsort(-probs, axis=1)[:, :2]]
    assert [set(e) for e in d[d.layer == layer].experts] == by_bias
    changed += sum(a != b for a, b in zip(by_bias, by_probs))
  assert changed > 0  # the bias changed some decisions: analysis must not ignore it


def test_lm_decisions_label_the_input_bytes(runs, decisions):
  run = analysis.load_run(runs["lm"])
  batch = next(data.make_loader(run.config.data, "validation", batch_size=8, seed=0,
                                shuffle=False, num_epochs=1, drop_remainder=False))
  d = decisions["lm"]
  assert sorted(d.layer.unique()) == [0, 1] and len(d) == 2 * 8 * 32
  rows = d[d.layer == 1]
  np.testing.assert_array_equal(rows.label, batch["inputs"].reshape(-1))
  assert rows.category.tolist() == analysis.byte_classes(batch["inputs"].reshape(-1)).tolist()
  assert (d.experts.map(len) == 2).all()  # topk, k = 2
  assert analysis.specialization(d, by="label").mi.ge(0).all()


def test_specialization_and_class_table(decisions):
  for router, d in decisions.items():
    spec = analysis.specialization(d)
    for layer, row in spec.set_index("layer").iterrows():
      rows = d[d.layer == layer]
      assert row.tokens == len(rows)
      assert row.mi == pytest.approx(hand_mi(rows.category, rows.top1), abs=1e-9)
      assert 0 <= row.mi <= min(row.h_label, row.h_expert) + 1e-9
      assert 0 <= row.mi_normalized <= 1
      table = analysis.class_expert_table(d, layer)
      assert table.to_numpy().sum() == len(rows)
      assert (-1 in table.columns) == (rows.top1 == -1).any()
      shares = analysis.class_expert_table(d, layer, normalize="label")
      np.testing.assert_allclose(shares[table.sum(axis=1) > 0].sum(axis=1), 1.0)
    if router != "lm":  # ViT: class names and ids carry the same information
      assert list(table.index) == list(d.category.cat.categories)
      np.testing.assert_allclose(analysis.specialization(d, by="label").mi, spec.mi)


def test_layer_transitions(decisions):
  for d in decisions.values():
    counts = analysis.layer_transitions(d, 0, 1)
    assert counts.to_numpy().sum() == (d.layer == 0).sum()
    top1 = d[d.layer == 0].top1.value_counts()
    np.testing.assert_array_equal(counts.sum(axis=1), top1.reindex(counts.index, fill_value=0))
    rows = analysis.layer_transitions(d, 0, 1, normalize="row")
    np.testing.assert_allclose(rows[counts.sum(axis=1) > 0].sum(axis=1), 1.0)


def test_expert_choice_coverage(decisions):
  switch = analysis.expert_choice_coverage(decisions["switch"])
  assert switch.groupby("layer").tokens.sum().tolist() == [TOKENS, TOKENS]
  assert switch.num_assigned.unique().tolist() == [0, 1]
  ec = analysis.expert_choice_coverage(decisions["expert_choice"])
  assert ec.groupby("layer").tokens.sum().tolist() == [TOKENS, TOKENS]
  assert ec.num_assigned.unique().tolist() == list(range(9))
  np.testing.assert_allclose(ec.groupby("layer").fraction.sum(), 1.0)
  # Expert choice fills every slot: 8 groups of 200 tokens x 8 experts x C = ceil(2 * 200 / 8).
  taken = (ec.num_assigned * ec.tokens).groupby(ec.layer).sum()
  assert taken.tolist() == [8 * 8 * 50] * 2


def test_coverage_counts_soft_tokens_under_all_experts():
  # Soft MoE: every expert processes every token (assigned = E); top-2: the choices kept.
  frame = pd.DataFrame({"layer": [0] * 3 + [1] * 3, "router": ["soft"] * 3 + ["topk"] * 3,
                        "num_experts": 4, "experts": [(2,), (0,), (1,), (0, 3), (1, 2), (3, 0)],
                        "assigned": [4, 4, 4, 2, 1, 2]})
  coverage = analysis.expert_choice_coverage(frame)
  soft, topk = (coverage[coverage.layer == layer] for layer in (0, 1))
  assert soft.num_assigned.tolist() == [0, 1, 2, 3, 4]
  assert soft.tokens.tolist() == [0, 0, 0, 0, 3] and soft.fraction.tolist() == [0, 0, 0, 0, 1]
  assert topk.num_assigned.tolist() == [0, 1, 2] and topk.tokens.tolist() == [0, 1, 2]
  np.testing.assert_allclose(topk.fraction, [0, 1 / 3, 2 / 3])


def test_routing_consistency(runs, decisions):
  for router in ("switch", "expert_choice"):
    same = analysis.compare_decisions(decisions[router], decisions[router])
    assert same.tokens.tolist() == [TOKENS, TOKENS] and same.step_a.tolist() == [20, 20]
    assert (same.top1_agreement == 1.0).all() and (same.topk_overlap == 1.0).all()
    changed = analysis.routing_consistency(runs[router], 10)
    assert changed.step_a.tolist() == [10, 10] and changed.step_b.tolist() == [20, 20]
    assert changed.topk_overlap.between(0, 1).all() and (changed.topk_overlap < 1).any()
    if router == "switch":  # top-1 routing: overlap and agreement are the same thing
      np.testing.assert_allclose(changed.topk_overlap, changed.top1_agreement)
  # By hand: top-2 sets {0,1} vs {1,2} overlap 1/2, {3,4} vs {4,3} 1; top-1 agrees once.
  a = pd.DataFrame({"layer": 0, "token": [0, 1], "experts": [(0, 1), (3, 4)], "top1": [0, 3],
                    "step": 1})
  b = a.assign(experts=[(1, 2), (4, 3)], top1=[1, 3], step=2)
  hand = analysis.compare_decisions(a, b).iloc[0]
  assert (hand.top1_agreement, hand.topk_overlap) == (0.5, 0.75)


def test_dense_runs_and_bad_arguments(tmp_path, runs, decisions):
  dense = tiny(common.vit("dense"))
  (tmp_path / "config.json").write_text(dense.to_json_best_effort())
  records = [{"step": 0, "model/total_params": 1},
             {"step": 5, "train/loss": 2.0, "train/task_loss": 2.0, "train/accuracy": 0.1}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                          + '{"step": 10, "train/lo')  # still being written
  assert analysis.expert_load(tmp_path).empty and analysis.routing_metrics(tmp_path).empty
  assert analysis.loss_curves(tmp_path).step.tolist() == [5]
  with pytest.raises(ValueError, match="dense model"):
    analysis.routing_decisions(tmp_path)
  with pytest.raises(ValueError, match=r"no checkpoint at step 7; it has \[10, 20\]"):
    analysis.routing_decisions(runs["switch"], step=7)
  with pytest.raises(TypeError, match="run directory"):
    analysis.specialization(decisions["switch"], step=10)
  with pytest.raises(ValueError, match="no MoE layer 5"):
    analysis.class_expert_table(decisions["switch"], 5)


def test_sweep_summary_groups_seeds():
  table = pd.DataFrame({"name": ["a", "b", "c", "d"], "config_arg": ["switch"] * 2 + ["topk"] * 2,
                        "model.moe.capacity_factor": [1.0, 1.0, 2.0, 2.0], "seed": [0, 1, 0, 1],
                        "status": ["finished", "finished", "finished", "failed"],
                        "eval/accuracy": [0.5, 0.7, 0.9, np.nan]})
  table["group"] = analysis.group_labels(table, ["config_arg", "model.moe.capacity_factor"])
  assert table.group.tolist()[1:3] == ["switch, capacity_factor=1.0", "topk, capacity_factor=2.0"]
  summary = analysis.sweep_summary(table)
  assert summary.members.tolist() == [2, 1]
  assert summary["eval/accuracy"].tolist() == pytest.approx([0.6, 0.9])
  assert summary["eval/accuracy std"].iloc[0] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert analysis.group_labels(table, []).unique().tolist() == ["all"]


def test_routing_trace_is_what_the_layers_routed_in_the_step(runs):
  """Step 1 of the traced loss_free run (2 micro-batches) read back, token by token, against
  the layers' own decisions on the run's first batch with its initial parameters (bias 0)."""
  assert trace.traced_steps(runs["loss_free"]) == list(range(1, 21))
  frame = analysis.routing_trace(runs["loss_free"], 1)
  assert frame.columns.tolist() == analysis.TRACE_COLUMNS and len(frame) == 2 * TOKENS
  config = run_configs()["loss_free"]
  info = data.dataset_info(config.data)
  images = next(data.make_loader(config.data, info["train_split"], batch_size=32,
                                 seed=config.seed, shuffle=True))["image"]
  model = models.get_model(config.model, info)
  variables = nn.meta.unbox(train.initial_variables(model, images, jax.random.key(config.seed)))
  apply = jax.jit(functools.partial(model.apply, deterministic=False, mutable=["intermediates"],
                                    rngs={"dropout": jax.random.key(0),
                                          "routing": jax.random.key(0)}))
  own = {}  # (layer, token) order: micro-batch i holds examples i, i + 2, ...
  for i in range(2):
    decisions = jax.device_get(apply(variables, images[i::2])[1]["intermediates"])
    example = np.arange(16).repeat(50) * 2 + i
    for layer in (0, 1):
      for name, value in decisions[f"block_{layer}"]["moe"]["decisions"][0].items():
        own.setdefault((layer, name), []).append((example * 50 + np.tile(np.arange(50), 16),
                                                  value.reshape(-1, 8)))
  for layer in (0, 1):
    rows = frame[frame.layer == layer]
    assert rows.token.tolist() == list(range(TOKENS)) and (rows.router == "loss_free").all()
    mine = {}
    for name in ("probs", "selected", "processed"):
      tokens, values = map(np.concatenate, zip(*own[layer, name]))
      mine[name] = values[np.argsort(tokens)]
    assert [set(e) for e in rows.experts] == [set(np.flatnonzero(s)) for s in mine["selected"]]
    np.testing.assert_array_equal(rows.assigned, mine["processed"].sum(axis=1))
    np.testing.assert_array_equal(rows.top1, mine["probs"].argmax(axis=1))
    kept = [np.flatnonzero(p) for p in mine["processed"]]
    gates = [sorted(g for g in gate if g > 0) for gate in rows.gates]
    for gate, experts, probs in zip(gates, kept, mine["probs"]):  # loss_free: p, not renormalized
      np.testing.assert_allclose(gate, sorted(probs[experts]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"has no routing trace of step 21; traced steps: \[1, "):
    analysis.routing_trace(runs["loss_free"], 21)


def test_a_run_replaying_its_own_trace_reaches_its_losses_and_routing(runs, tmp_path):
  config = run_configs()["loss_free"]
  config.train.update(trace_every=0, replay_from=runs["loss_free"])
  train.train_and_evaluate(config, str(tmp_path))
  records = lambda run_dir: [{k: v for k, v in r.items() if k.startswith("train/")}
                             for r in analysis.load_run(run_dir).train_records]
  assert records(tmp_path) == records(runs["loss_free"])  # the bias moved the same way, too
