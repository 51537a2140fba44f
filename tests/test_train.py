"""Training on the real datasets: loss goes down, exact resume after a kill, clear errors."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common, vit_smear, vit_stablemoe
from moe_jax import analysis
from moe_jax import checkpoints as checkpoints_lib
from moe_jax import config as config_lib
from moe_jax import runlock, sweep, train
from moe_jax.models import common as model_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, steps=30):
  """Shrinks a shipped config so a test trains it in seconds."""
  config.model.num_layers = 2
  config.model.width = 64
  config.model.num_heads = 2
  config.train.num_steps = steps
  config.train.warmup_steps = 5
  config.train.log_every = 5
  config.train.eval_every = steps
  config.train.eval_max_batches = 2
  config.train.checkpoint_every = 10
  return config


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return [r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]


def test_vit_moe_trains_on_fashion_mnist(tmp_path, monkeypatch):
  config = tiny(common.vit("gshard"))
  config.train.batch_size = 64
  config.train.learning_rate = 3e-3
  # The MoE layers are derived from the config once (models.layer_plan), for the checks, the
  # model, the FLOP counts, sharding and the trace alike.
  derivations, derive = [], model_common.moe_layers
  monkeypatch.setattr(model_common, "moe_layers",
                      lambda *args, **kwargs: derivations.append(1) or derive(*args, **kwargs))
  final = train.train_and_evaluate(config, str(tmp_path))
  assert len(derivations) == 1
  assert final["router_statistics"] == {}  # gshard declares none of its own
  losses = train_losses(tmp_path)
  assert losses[0] > 1.8  # ln 10 = 2.30 at the start
  assert losses[-1] < losses[0] - 0.6
  assert final["eval"]["eval/accuracy"] > 0.5  # 10 classes: chance is 0.1
  records = read_jsonl(tmp_path / "metrics.jsonl")
  routing = [k for k in records[-2] if k.startswith("train/routing/")]
  assert "train/routing/block_1/moe/expert_load" in routing
  assert len(records[-2]["train/routing/block_1/moe/expert_load"]) == 8
  # the load monitor's summary of that list (moe_jax/monitor.py)
  load = np.asarray(records[-2]["train/routing/block_1/moe/expert_load"]) * 8
  assert records[-2]["train/routing/block_1/moe/load_max"] == pytest.approx(load.max())
  assert records[-2]["train/routing/block_1/moe/top_expert"] == int(np.argmax(load))
  assert os.listdir(tmp_path / "tb") and json.load(open(tmp_path / "config.json"))["model"]


def test_vit_smear_config_trains_20_steps(tmp_path):
  config = tiny(vit_smear.get_config(), steps=20)
  config.model.width = 32
  config.train.update(batch_size=32, checkpoint_every=20, eval_max_batches=1)
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  record = read_jsonl(tmp_path / "metrics.jsonl")[-2]
  entropy = record["train/routing/block_1/moe/merge_entropy"]
  assert 0 < entropy <= np.log(8) + 1e-6
  assert final["eval"]["eval/accuracy"] > 0.1
  # The notebooks' frame and the sweep's row carry the statistic; the last record is the final.
  last = final["train"]["train/routing/block_1/moe/merge_entropy"]
  assert analysis.routing_metrics(tmp_path).merge_entropy.iloc[-1] == last
  row = sweep.member_results(str(tmp_path))
  assert row["merge_entropy"] == pytest.approx(last) and "zero_computation_share" not in row


def test_byte_lm_moe_trains_on_stdlib(tmp_path):
  config = tiny(common.lm("topk"))
  config.data.seq_len = 64
  config.model.moe.group_size = 64
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert losses[0] > 4.5  # ln 256 = 5.55 at the start
  assert losses[-1] < 3.8
  bits = final["eval"]["eval/bits_per_byte"]
  assert bits == pytest.approx(final["eval"]["eval/loss"] / np.log(2))
  assert bits < 5.5


TRAIN_CMD = [sys.executable, "-m", "experiments.train", "--config", "configs/vit_switch.py",
             "--config.model.num_layers=2", "--config.model.width=32",
             "--config.model.num_heads=2", "--config.train.batch_size=32",
             "--config.model.moe.group_size=100", "--config.train.num_steps=40",
             "--config.train.warmup_steps=5", "--config.train.log_every=5",
             "--config.train.eval_every=20", "--config.train.eval_max_batches=2",
             "--config.train.checkpoint_every=10", "--config.model.moe.router=gshard"]


def run_training(workdir, kill_after_checkpoint=None):
  """Runs the entry point; optionally SIGKILLs it once that checkpoint step is on disk."""
  proc = subprocess.Popen(TRAIN_CMD + [f"--workdir={workdir}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if kill_after_checkpoint is None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output
  ckpt = os.path.join(workdir, "checkpoints", str(kill_after_checkpoint))
  deadline = time.time() + 300
  while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def test_killed_run_resumes_to_identical_metrics(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  output = run_training(straight)
  assert "Metrics:" in output
  run_training(killed, kill_after_checkpoint=20)
  assert not os.path.exists(killed / "final_metrics.json")
  # The killed run's lock file still names it, but the kernel released its lock: taken over.
  assert (killed / "run.lock").read_text().startswith("pid ")
  assert runlock.holder(str(killed)) is None
  run_training(killed)
  final = [json.load(open(d / "final_metrics.json")) for d in (straight, killed)]
  assert final[0]["eval"] == final[1]["eval"]
  assert final[0]["train"]["train/loss"] == final[1]["train"]["train/loss"]
  # Every step logged exactly once, with the same values.
  records = [[r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]
             for d in (straight, killed)]
  assert [r["step"] for r in records[1]] == list(range(5, 41, 5))
  assert [r["train/loss"] for r in records[0]] == [r["train/loss"] for r in records[1]]
  # The command-line override reached the run.
  assert json.load(open(killed / "config.json"))["model"]["moe"]["router"] == "gshard"
  # The last checkpoint holds the final step and restores through orbax.
  with ocp.CheckpointManager(str(killed / "checkpoints")) as manager:
    assert manager.latest_step() == 40
    assert sorted(manager.all_steps()) == [20, 30, 40]  # keep_checkpoints = 3


def test_a_second_writer_stops_naming_the_holder_and_the_first_stops_on_sigterm(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(TRAIN_CMD + ["--config.train.num_steps=100000", f"--workdir={workdir}"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline, metrics = time.time() + 120, workdir / "metrics.jsonl"
  while (not (metrics.exists() and "train/loss" in metrics.read_text())
         and first.poll() is None and time.time() < deadline):  # until it trains and logs
    time.sleep(0.05)
  holder = f"pid {first.pid} on host {socket.gethostname()}"
  assert runlock.holder(str(workdir)) == holder
  second = subprocess.run(TRAIN_CMD + [f"--workdir={workdir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert second.returncode == 4
  assert second.stderr.strip() == (f"Run error: {workdir} is in use by {holder} ({workdir}/"
                                   "run.lock); stop that run or wait for it to end")
  first.send_signal(signal.SIGTERM)  # as a scheduler stops it: like Ctrl-C
  _, errors = first.communicate(timeout=120)
  assert first.returncode == 130
  assert errors.strip().splitlines()[-1] == (
      "Interrupted; run the same command to resume from the last checkpoint")
  assert len(os.listdir(workdir / "tb")) == 1  # one writer: one event file
  steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert steps and steps == sorted(set(steps))  # each logged once, in order


def test_a_signal_inside_the_train_loop_waits_for_the_step_and_a_second_one_does_not():
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

  def deliver(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs in the main thread at its next bytecode

  try:
    runlock.interrupt_on_sigterm()
    with runlock.deferred_interrupts():
      deliver(signal.SIGTERM)
      assert runlock.stop_requested()
      with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGINT)
    assert not runlock.stop_requested()
    with pytest.raises(KeyboardInterrupt):  # outside the loop: at once, as before
      deliver(signal.SIGTERM)
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)


def test_a_diverging_run_says_so_in_one_line_with_its_own_exit_code(tmp_path):
  done = subprocess.run(TRAIN_CMD + ["--config.train.num_steps=10",
                                     "--config.train.learning_rate=1e8",
                                     "--config.train.grad_clip_norm=1e8", f"--workdir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 3
  assert re.fullmatch(r"Diverged: loss is nan at step \d; run stopped, nothing saved after it "
                      r"\(no checkpoint yet: a rerun starts from step 0\)", done.stderr.strip())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 20-step run with checkpoints at steps 10 and 20: (config, workdir)."""
  config = tiny(common.vit("switch"), steps=20)
  config.train.batch_size = 32
  config.model.moe.group_size = 100
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def damage(checkpoint, how):
  """Damages one checkpoint directory as a full disk, a careless hand or a crash could."""
  arrays = checkpoint / "state" / "ocdbt.process_0" / "d"
  largest = max(arrays.iterdir(), key=lambda path: path.stat().st_size)
  if how == "truncated file":
    os.truncate(largest, 1000)
  elif how == "deleted file":
    os.remove(largest)
  else:  # deleted metadata
    os.remove(checkpoint / "state" / "_METADATA")
  return largest.relative_to(checkpoint)


def copy_unfinished(workdir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  os.remove(copy / "final_metrics.json")
  return copy


@pytest.mark.parametrize("how,reason", [
    ("truncated file", r'OUT_OF_RANGE: Error reading ".*" in OCDBT database at local file ".*": '
                       r"Requested byte range \[\d+, \d+\) is not valid for value of size 1000"),
    ("deleted file", r'FAILED_PRECONDITION: Error reading ".*" in OCDBT database at local file '
                     r'".*": Truncated Zstd-compressed stream; at byte 0; at uncompressed byte 0'),
    ("deleted metadata", r"pytree structure error: different types at key path"),
])
def test_a_corrupt_checkpoint_costs_one_checkpoint_not_the_run(finished_run, tmp_path, capsys,
                                                               how, reason):
  config, finished = finished_run
  workdir = copy_unfinished(finished, tmp_path)
  damaged = damage(workdir / "checkpoints" / "20", how)
  capsys.readouterr()
  final = train.train_and_evaluate(config, str(workdir))
  output = capsys.readouterr().out.splitlines()
  aside = workdir / "checkpoints_unreadable" / "20"
  assert re.fullmatch(f"Checkpoint step 20 is unreadable \\({reason}\\); moved to "
                      f"{re.escape(str(aside))}", output[0]), output[0]
  assert output[1] == f"Resumed from step 10 of {workdir}"
  assert final["eval"] == json.load(open(finished / "final_metrics.json"))["eval"]
  assert train_losses(workdir) == train_losses(finished)
  assert (aside / damaged).exists() == (how != "deleted file")  # moved, nothing deleted
  with ocp.CheckpointManager(str(workdir / "checkpoints")) as manager:
    assert manager.all_steps() == [10, 20]  # step 20 saved again


def test_no_readable_checkpoint_is_one_line(finished_run, tmp_path):
  config, finished = finished_run
  workdir = copy_unfinished(finished, tmp_path)
  for step in (10, 20):
    damage(workdir / "checkpoints" / str(step), "deleted metadata")
  with pytest.raises(checkpoints_lib.NoReadableCheckpoint, match=(
      f"^no checkpoint of {re.escape(str(workdir))} is readable: steps 20, 10 moved to "
      f"{re.escape(str(workdir / 'checkpoints_unreadable'))}; running again starts from step "
      "0$")):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints_unreadable")) == ["10", "20"]
  assert not os.listdir(workdir / "checkpoints")


def test_diverging_run_stops_naming_the_step_and_keeps_its_checkpoint(tmp_path):
  healthy = tiny(common.vit("switch"), steps=10)
  train.train_and_evaluate(healthy, str(tmp_path))
  # Continue the same run with an absurd learning rate: it must stop at the first NaN.
  diverging = tiny(common.vit("switch"), steps=40)
  diverging.train.learning_rate = 1e8
  diverging.train.grad_clip_norm = 1e8
  with pytest.raises(FloatingPointError, match=r"^loss is nan at step 1[1-9]; run stopped, "
                                               r"nothing saved after it \(last checkpoint: "
                                               r"step 10\)$"):
    train.train_and_evaluate(diverging, str(tmp_path))
  with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as manager:
    assert manager.all_steps() == [10]
    restored = manager.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.model.moe.__setattr__("rooter", "x"),
     "config.model.moe.rooter is unknown; allowed keys of config.model.moe: "),
    (lambda c: c.train.__setattr__("batch_size", 0), "config.train.batch_size=0 must be >= 1"),
    (lambda c: c.model.moe.__setattr__("k", 9),
     r"config.model.moe.k=9 must be in \[1, num_experts=8\]"),
    (lambda c: c.model.moe.__setattr__("capacity_factor", 0.0),
     "config.model.moe.capacity_factor=0.0 must be > 0"),
    (lambda c: c.model.moe.__setattr__("group_size", 300),
     r"config.model.moe.group_size=300 does not divide the 6400 tokens of a batch "
     r"\(batch_size 128 x 50 tokens\)"),
    (lambda c: c.train.__setattr__("microbatches", 3),
     "config.train.microbatches=3 must divide config.train.batch_size=128$"),
    (lambda c: c.train.__setattr__("microbatches", 32) or c.model.moe.__setattr__("group_size",
                                                                                   150),
     r"config.model.moe.group_size=150 does not divide the 200 tokens of a micro-batch \(1/32\) "
     r"\(batch_size 4 x 50 tokens\)$"),
    (lambda c: c.model.moe.__setattr__("router_dtype", "float16"),
     "config.model.moe.router_dtype='float16' is unknown; allowed: 'float32', 'float64'$"),
    (lambda c: c.model.moe.__setattr__("router_dtype", "float64"),  # tests run without x64
     "config.model.moe.router_dtype='float64' needs 64-bit JAX: run with JAX_ENABLE_X64=1 "),
    (lambda c: c.model.moe.__setattr__("granularity", 3),
     "config.model.moe.granularity=3 must divide config.model.moe.expert_hidden_dim=256$"),
    (lambda c: c.model.moe.__setattr__("k", 0),  # was taken as "the router's default k"
     r"config.model.moe.k=0 must be in \[1, num_experts=8\]$"),
    (lambda c: c.model.__setattr__("activation", "tanh"),
     "config.model.activation='tanh' is unknown; allowed: 'gelu', 'relu', 'swiglu'$"),
    (lambda c: c.train.update(num_steps=20, warmup_steps=40),  # a shortened run, warmup kept
     r"config.train.warmup_steps=40 must be in \[0, num_steps=20\] or None \(a tenth of "
     r"num_steps: 2\)$"),
    (lambda c: c.model.moe.update(router="loss_free", k=2) or c.model.moe.loss_free.__setattr__(
        "score_function", "tanh"),
     r"config.model.moe.loss_free.score_function='tanh' is unknown; allowed: 'softmax', "
     r"'sigmoid', 'sqrtsoftplus'$"),
    (lambda c: c.model.moe.update(router="gshard") or c.model.moe.gshard.__setattr__(
        "second_expert_policy", "first"),
     r"config.model.moe.gshard.second_expert_policy='first' is unknown; allowed: 'all', "
     r"'random'$"),
])
def test_config_errors_name_the_field(change, message):
  config = common.vit("topk")
  config.unlock()
  change(config)
  with pytest.raises(ValueError, match="^" + message):
    config_lib.validate(config, tokens_per_example=50)


def test_saved_configs_of_earlier_runs_load_with_the_fields_that_moved_into_router_blocks():
  saved = common.vit("gshard").to_dict()
  for router in ("gshard", "loss_free"):
    del saved["model"]["moe"][router]
  saved["model"]["moe"].update(second_expert_policy="all", router_scores="sigmoid",
                               bias_update_rate=0.01)  # as runs before the router registry
  config = ml_collections.ConfigDict(config_lib.upgrade(saved))
  assert config.model.moe.gshard.to_dict() == {"second_expert_policy": "all"}
  assert config.model.moe.loss_free.to_dict() == {"score_function": "sigmoid",
                                                    "bias_update_rate": 0.01}
  assert "second_expert_policy" not in config.model.moe
  config_lib.validate(config, tokens_per_example=50)  # gshard.renormalize: the default
  # A run saved where another router was registered holds its settings block: unused here.
  config.model.moe.unlock()
  config.model.moe.elsewhere = ml_collections.ConfigDict({"init_temperature": 1.0})
  from moe_jax import models
  layers = models.layer_plan(config.model, {"image_shape": (28, 28, 1), "num_classes": 10})
  assert [layer.router for layer in layers.moe_layers().values()] == ["gshard", "gshard"]


def test_first_argmax_matches_jnp_argmax_with_ties_and_the_task_accuracy_uses_it():
  # Logits on a coarse grid so rows have tied maxima; argmax picks the first of them.
  logits = jax.random.randint(jax.random.key(0), (4, 50, 7), -3, 3).astype(np.float32)
  assert (logits == logits.max(-1, keepdims=True)).sum(-1).max() > 1  # ties are present
  np.testing.assert_array_equal(train.first_argmax(logits), np.argmax(logits, -1))
  labels = np.array([[0, 2], [1, 1]])
  x = np.array([[[5.0, 5.0, 1.0], [0.0, 1.0, 1.0]], [[2.0, 9.0, 2.0], [3.0, 3.0, 3.0]]])
  # First maxima: 0, 1 / 1, 0: correct, wrong / correct, wrong.
  _, sums = train.task_loss(x, {"targets": labels}, "text")
  assert float(sums["correct"]) == 2.0 and float(sums["count"]) == 4.0


def test_eval_step_keeps_padding_examples_out_of_routing():
  from tests.test_models import example, init, make_config, padded
  # As in test_models: groups of 9 mix real and padding tokens and capacity binds.
  config = make_config("lm", {"router": "topk", "group_size": 9, "eval_capacity_factor": 1.0})
  inputs = example("lm", batch=3)
  model, params = init(config, inputs)
  weights = ml_collections.ConfigDict({"aux_loss_weight": 1e-2, "seq_aux_loss_weight": 1e-3,
                                       "global_aux_loss_weight": 1e-3, "z_loss_weight": 1e-3})
  _, eval_step = train.make_steps(model, None, weights, "text")
  targets = np.roll(inputs, -1, axis=1)
  sums = eval_step(params, {}, {"inputs": inputs, "targets": targets})
  padded_inputs, mask = padded(inputs, extra=2)
  padded_sums = eval_step(params, {}, {"inputs": padded_inputs, "mask": mask,
                                       "targets": padded(targets, extra=2)[0]})
  assert float(padded_sums["count"]) == float(sums["count"]) == 24
  for key in sums:
    np.testing.assert_allclose(padded_sums[key], sums[key], rtol=1e-6, err_msg=key)


def test_expert_choice_is_refused_in_the_causal_lm():
  config = common.lm("expert_choice")
  with pytest.raises(ValueError, match="^config.model.moe.router='expert_choice' reads future "
                                       "tokens and is invalid in a causal decoder"):
    config_lib.validate(config, tokens_per_example=256)


def test_wrong_type_is_refused():
  config = ml_collections.ConfigDict(common.vit("switch").to_dict(), type_safe=False)
  config.train.learning_rate = "fast"  # as a config file built from plain dicts could
  with pytest.raises(ValueError, match="^config.train.learning_rate='fast' must be of type "
                                       "float$"):
    config_lib.validate(config, tokens_per_example=50)


def restored_state(workdir, step):
  with ocp.CheckpointManager(str(workdir / "checkpoints")) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def loss_free_config():
  """A loss_free ViT of 6 steps, checkpointed every 3, whose biases move (0.01 a step)."""
  config = tiny(common.vit("loss_free"), steps=6)
  config.train.batch_size = 32
  config.model.moe.group_size = 100
  config.model.moe.loss_free.bias_update_rate = 0.01
  config.train.checkpoint_every = config.train.log_every = 3
  return config


def test_loss_free_bias_is_checkpointed_and_a_resumed_run_matches(tmp_path):
  config = loss_free_config()
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, resumed)  # as if killed after step 3: drop what came later
  shutil.rmtree(resumed / "checkpoints" / "6")
  os.remove(resumed / "final_metrics.json")
  train.train_and_evaluate(config, str(resumed))
  assert train_losses(straight) == train_losses(resumed)
  finals = [json.load(open(d / "final_metrics.json")) for d in (straight, resumed)]
  assert finals[0]["eval"] == finals[1]["eval"]
  biases = [restored_state(d, 6)["router_state"]["block_1"]["moe"]["router"]["bias"]
            for d in (straight, resumed)]
  np.testing.assert_array_equal(biases[0], biases[1])
  assert biases[0].dtype == np.float32 and biases[0].shape == (8,)
  # 6 updates of +-0.01 (or 0): every entry a multiple of 0.01 in [-0.06, 0.06], not all 0.
  steps = np.asarray(biases[0]) / 0.01
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
  assert 0 < np.abs(steps).max() <= 6
  assert "router_state" not in str(restored_state(straight, 3)["params"].keys())


def test_stablemoe_trains_through_both_stages_and_checkpoints_its_step_count(tmp_path):
  config = vit_stablemoe.get_config()
  assert config.model.moe.stablemoe.distill_steps == config.train.num_steps // 10
  config = tiny(config, steps=20)
  config.model.moe.stablemoe.distill_steps = 10
  config.model.num_layers, config.model.moe.every = 1, 1  # one block, an MoE one: compiles faster
  config.train.batch_size = 16
  config.train.eval_max_batches = 1
  config.model.moe.group_size = 100
  train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  balance = [r["train/load_balance_loss"] for r in records]
  assert balance[0] > 0 and balance[1] > 0 and balance[2:] == [0, 0]  # stage 2 from step 11
  states = {step: restored_state(tmp_path, step)["router_state"]["block_0"]["moe"]["router"]
            for step in (10, 20)}
  assert [int(states[step]["step"]) for step in (10, 20)] == [10, 20]
  for name in ("distill_embedding", "distill_kernel"):  # stage 2 routes by a frozen copy
    np.testing.assert_array_equal(states[10][name], states[20][name])


@pytest.mark.parametrize("args,message", [
    (["--config=configs/vit.py", "--config.train.num_stepz=3"],
     'Config error: --config.train.num_stepz: no such config field. Did you mean "num_steps" '
     'instead of "num_stepz"?'),
    (["--config=configs/vit.py:swich"],
     "Config error: router='swich' has no equal-FLOP rule in configs/common.py; allowed: "
     "'dense', 'switch', 'gshard', 'topk', 'expert_choice', 'vmoe', 'soft', 'hash', 'random', "
     "'base', 'loss_free', 'cosine', 'sbase', 'top_p', 'forced', 'remoe', 'dselect_k', "
     "'moepp', 'stablemoe', 'smear', 'domain', 'deepseek', 'residual', 'mod'"),
    (["--config=configs/vit_smear.py", "--config.model.moe.dispatch_path=index"],
     "Config error: config.model.moe.dispatch_path='index' takes the routing forms 'choices', "
     "'slots', not the 'merge' form of router='smear'; allowed paths for it: 'merge'"),
    (["--config=configs/nope.py"],
     "Config error: [Errno 2] No such file or directory: 'configs/nope.py'"),
    (["--config=configs/nope.py", "--config.seed=1"],  # overrides wrap the error once more
     "Config error: [Errno 2] No such file or directory: 'configs/nope.py'"),
    (["--config=configs/vit.py", "--config.train.num_steps=twenty"],
     "Config error: --config.train.num_steps=twenty: invalid literal for int() with base 10: "
     "'twenty'"),
    (["--config=configs/vit.py", "--config.model.patch_size=5"],  # not its group size
     "Config error: config.model.patch_size=5 must divide the image size 28x28"),
    (["--config=configs/vit_stablemoe.py", "--config.model.moe.stablemoe.distill_steps=-1"],
     "Config error: config.model.moe.stablemoe.distill_steps=-1 must be >= 0"),
])
def test_entry_point_says_a_config_error_in_one_line(tmp_path, args, message):
  done = subprocess.run([sys.executable, "-m", "experiments.train", *args,
                         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip() == message
  assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("workdir,message", [
    ("file", "Config error: --workdir={} is a file, not a directory"),
    ("file/run", "Config error: --workdir={} cannot be created: {}/file is a file"),
])
def test_entry_point_refuses_a_workdir_that_is_not_a_directory(tmp_path, workdir, message):
  (tmp_path / "file").write_text("notes")
  done = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/vit.py",
                         f"--workdir={tmp_path / workdir}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip() == message.format(tmp_path / workdir, tmp_path)
  assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("pair", [("dense", "topk"), ("topk", "expert_choice")])
def test_members_sharing_a_seed_share_batches_and_every_common_initial_parameter(pair):
  """Common random numbers: at one seed two routers differ by routing alone."""
  import flax
  from moe_jax import data, models

  configs = [common.vit(router) for router in pair]
  info = data.dataset_info(configs[0].data)
  batches = [data.make_loader(c.data, info["train_split"], batch_size=c.train.batch_size,
                              seed=c.seed, shuffle=True) for c in configs]
  for _ in range(2):
    first, second = next(batches[0]), next(batches[1])
    assert first.keys() == second.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])
  sample = first["image"][:2]
  params = [flax.traverse_util.flatten_dict(flax.linen.meta.unbox(train.initial_variables(
      models.get_model(c.model, info), sample, jax.random.key(c.seed))["params"]), sep="/")
      for c in configs]
  common_paths = params[0].keys() & params[1].keys()
  # Everything but the FFN of the MoE blocks (1 and 3) is common: embeddings, attention, norms,
  # the dense MLPs of blocks 0 and 2, the head.
  assert {path.split("/")[0] for path in common_paths} >= {"block_0", "block_1", "block_2",
                                                            "block_3", "head"}
  assert len(common_paths) >= 25
  assert not any("/moe/" in path for path in common_paths if "dense" in pair)
  for path in common_paths:
    np.testing.assert_array_equal(params[0][path], params[1][path], err_msg=path)
  # A different seed changes them: the equality above is not a constant initializer's.
  other = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(train.initial_variables(
      models.get_model(configs[0].model, info), sample, jax.random.key(1))["params"]), sep="/")
  assert not np.array_equal(other["block_0/attn/query/kernel"],
                            params[0]["block_0/attn/query/kernel"])


def test_interval_counts_train_steps_only_across_pauses(monkeypatch):
  """An evaluation between two log steps pauses the clock; the steps before it still count."""
  clock = {"wall": 100.0, "cpu": 10.0}
  monkeypatch.setattr(train.time, "perf_counter", lambda: clock["wall"])
  monkeypatch.setattr(train.time, "process_time", lambda: clock["cpu"])
  interval = train.Interval()
  clock["wall"] += 3.0; clock["cpu"] += 3.0 * interval.cores  # 3 s of steps, every core busy
  interval.pause()
  clock["wall"] += 50.0; clock["cpu"] += 5.0  # an evaluation: not train time
  interval.resume()
  clock["wall"] += 2.0; clock["cpu"] += 1.0 * interval.cores  # 2 s of steps, half the cores
  interval.pause()
  measured = interval.measure()
  assert measured["seconds"] == pytest.approx(5.0)
  assert measured["cpu_share"] == pytest.approx(4.0 / 5.0)
  interval.resume()
  clock["wall"] += 4.0; clock["cpu"] += 4.0
  interval.pause()
  assert interval.measure()["seconds"] == pytest.approx(4.0)  # measure started a new interval


def test_the_py_wrapper_runs_the_venv_python_with_tcmalloc():
  environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # make test sets it
  done = subprocess.run([os.path.join(ROOT, "py"), "-c", "import absl, os, sys\n"
                         "print(sys.prefix)\nprint(os.environ['LD_PRELOAD'])"],
                        capture_output=True, text=True, timeout=60, env=environment)
  prefix, preload = done.stdout.split()
  assert os.path.samefile(prefix, os.path.join(ROOT, ".venv"))
  assert os.path.basename(preload) == "libtcmalloc_minimal.so.4" and os.path.exists(preload)


def test_balance_losses_sum_over_layers_each_under_its_own_weight():
  sown = {"losses": {f"block_{i}": {"moe": {"load_balance_loss": (1.0 + i,),
                                            "seq_balance_loss": (2.0 * i,),
                                            "global_balance_loss": (0.5,), "z_loss": (3.0,)}}
                     for i in (1, 3)}}
  terms = train.moe_terms(sown)
  assert {name: float(terms[name]) for name in train.BALANCE_LOSSES} == {
      "load_balance_loss": 6.0, "seq_balance_loss": 8.0, "global_balance_loss": 1.0}
  assert float(terms["z_loss"]) == 6.0
  assert set(train.BALANCE_LOSSES.values()) <= set(config_lib.default_config().train.keys())
