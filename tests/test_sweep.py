"""Sweeps: member expansion and names, dry run, a real sweep with a failing member, resume."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from configs import common
from experiments import sweep as sweep_cli
from moe_jax import runlock, sweep
from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A ViT small enough that one member trains in seconds (and its eval reads one batch).
TINY = {"model.num_layers": 2, "model.width": 32, "model.num_heads": 2,
        "model.moe.group_size": 100, "train.batch_size": 32, "train.num_steps": 10,
        "train.warmup_steps": 2, "train.log_every": 2, "train.eval_every": 10,
        "train.eval_max_batches": 1, "train.checkpoint_every": 10}


def write_sweep(tmp_path, definition):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(f"def get_sweep():\n  return {definition!r}\n")
  return str(path)


def test_grid_times_members_expands_with_stable_readable_names(tmp_path):
  path = write_sweep(tmp_path, {
      "base": "configs/vit.py", "fixed": {"train.num_steps": 5},
      "grid": {"config_arg": ["switch", "topk"], "seed": [0, 1]},
      "members": [{"model.moe.capacity_factor": 1.0, "model.moe.layers": (1, 3)},
                  {"model.moe.capacity_factor": 2.0, "model.dropout": 0.1,
                   "data.files": "my notes/**/*.txt"}]})
  definition = sweep.load_sweep(path)
  members = sweep.expand(definition, str(tmp_path / "runs"))
  # Keys show their last part unless another key ends the same way; config_arg its value only.
  assert [m["name"] for m in members][:4] == [
      "switch,seed=0,capacity_factor=1,layers=1-3",
      "switch,seed=0,capacity_factor=2,dropout=0.1,files=my_notes_____.txt",
      "switch,seed=1,capacity_factor=1,layers=1-3",
      "switch,seed=1,capacity_factor=2,dropout=0.1,files=my_notes_____.txt"]
  assert len(members) == 8 and members[-1]["name"].startswith("topk,seed=1,")
  assert members[0]["overrides"] == {"config_arg": "switch", "seed": 0,
                                     "model.moe.capacity_factor": 1.0,
                                     "model.moe.layers": (1, 3)}
  assert members[0]["command"] == [
      sys.executable, "-m", "experiments.train", "--config=configs/vit.py:switch",
      f"--workdir={tmp_path}/runs/switch,seed=0,capacity_factor=1,layers=1-3",
      "--config.train.num_steps=5", "--config.seed=0", "--config.model.moe.capacity_factor=1.0",
      "--config.model.moe.layers=(1, 3)"]
  # Same definition, same names; ambiguous last parts keep the full key.
  assert [m["name"] for m in sweep.expand(sweep.load_sweep(path), "elsewhere")] == [
      m["name"] for m in members]
  assert sweep.member_names([{"model.dropout": 0.1}, {"model.moe.capacity_factor": 2.0},
                             {"train.dropout": True}]) == [
      "model.dropout=0.1", "capacity_factor=2", "train.dropout=True"]


@pytest.mark.parametrize("definition,message", [
    ({"base": "configs/vit.py", "grid": {"seed": [0, 0]}}, "several sweep members are named"),
    ({"base": "configs/vit.py"}, "a sweep needs 'grid', 'members' or both"),
    ({"base": "configs/vit.py", "members": [{"config.seed": 1}]}, "leave out the 'config.'"),
    ({"base": "configs/vit.py", "grid": {"seed": [0]}, "fxed": {}}, "unknown sweep keys"),
])
def test_bad_sweeps_are_refused(tmp_path, definition, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(sweep.load_sweep(write_sweep(tmp_path, definition)), str(tmp_path))


@pytest.mark.parametrize("text,message", [
    (None, "{}: no such file"),
    ("def get_sweep(:\n", "{}, line 1: invalid syntax"),
    ("SWEEP = {}\n", "{}: defines no get_sweep(); see moe_jax/sweep.py for the format"),
    ("def get_sweep():\n  return {'base': BASE}\n", "{}: NameError: name 'BASE' is not defined"),
])
def test_a_bad_sweep_file_is_one_line(tmp_path, text, message):
  path = tmp_path / "sweep.py"
  if text is not None:
    path.write_text(text)
  with pytest.raises(SystemExit) as stop:
    sweep_cli.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs")])
  assert stop.value.code == "Sweep error: " + message.format(path)


def test_dry_run_lists_members_and_commands_and_runs_nothing(tmp_path, capsys):
  path = write_sweep(tmp_path, {"base": "configs/vit.py",
                                "fixed": {"train.num_steps": 5, "train.warmup_steps": 1},
                                "grid": {"config_arg": ["dense", "gshard"]}})
  workdir = tmp_path / "runs"
  assert sweep_cli.main(["--sweep", path, "--workdir", str(workdir), "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"2 members of {path} in {workdir} (commands run in {ROOT}):"
  assert lines[1] == "dense  [pending]"
  assert lines[2] == (f"  {sys.executable} -m experiments.train --config=configs/vit.py:dense "
                      f"--workdir={workdir}/dense --config.train.num_steps=5 "
                      "--config.train.warmup_steps=1")
  assert lines[3] == "gshard  [pending]" and len(lines) == 5
  assert not workdir.exists()


def test_dry_run_checks_every_member_as_a_real_start_would(tmp_path, capsys):
  path = write_sweep(tmp_path, {"base": "configs/vit.py", "fixed": {"train.num_steps": 20},
                                "members": [{"config_arg": "switch", "train.warmup_steps": 2},
                                            {"config_arg": "switch", "train.warmup_steps": 40},
                                            {"config_arg": "switch"},
                                            {"config_arg": "topk", "train.num_steps": "twenty"},
                                            {"config_arg": "topk", "model.moe.rooter": "x"}]})
  workdir = tmp_path / "runs"
  assert sweep_cli.main(["--sweep", path, "--workdir", str(workdir), "--dry-run"]) == 1
  lines = capsys.readouterr().out.splitlines()
  errors = [line for line in lines if not line.startswith(("  /", f"  {sys.executable}"))]
  assert errors[1:] == [
      "switch,warmup_steps=2  [pending]",
      "switch,warmup_steps=40  [pending]",
      "  Config error: config.train.warmup_steps=40 must be in [0, num_steps=20] or None (a tenth "
      "of num_steps: 2)",
      "switch  [pending]",
      "topk,num_steps=twenty  [pending]",
      "  Config error: --config.train.num_steps=twenty: invalid literal for int() with base 10: "
      "'twenty'",
      "topk,rooter=x  [pending]",
      "  Config error: --config.model.moe.rooter: no such config field. Did you mean \"router\" "
      "instead of \"rooter\"?",
      "3 of 5 members would stop with a config error"]
  assert not workdir.exists()
  missing = write_sweep(tmp_path, {"base": "configs/nope.py", "grid": {"seed": [0]}})
  assert sweep_cli.main(["--sweep", missing, "--workdir", str(workdir), "--dry-run"]) == 1
  assert capsys.readouterr().out.splitlines()[-2:] == [
      "  Config error: [Errno 2] No such file or directory: 'configs/nope.py'",
      "1 of 1 members would stop with a config error"]


def test_zoo_and_balancing_sweeps_expand_to_every_router_and_balancing():
  zoo = sweep.expand(sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/zoo.py")), "runs")
  assert [m["name"] for m in zoo[:3]] == ["dense,seed=0", "switch,seed=0", "gshard,seed=0"]
  assert len(zoo) == 3 * len(common.zoo()) == 66
  assert {m["overrides"]["config_arg"] for m in zoo} == set(common.zoo()) >= {
      "switch", "gshard", "topk", "expert_choice", "loss_free", "soft", "hash", "random",
      "base", "vmoe", "cosine", "sbase", "top_p", "remoe", "dselect_k", "moepp", "stablemoe",
      "smear", "deepseek", "residual", "mod"}
  assert zoo[-1]["command"][3] == "--config=configs/vit.py:mod"
  balancing = sweep.expand(sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/balancing.py")),
                           "runs")
  assert [m["name"] for m in balancing[:3]] == [
      "topk,seed=0", "loss_free,seed=0", "topk,aux_loss_weight=0,seed=0"]
  assert balancing[2]["command"][3:4] == ["--config=configs/lm.py:topk"]
  assert "--config.train.aux_loss_weight=0.0" in balancing[2]["command"]


def test_error_line_finds_the_exception_under_later_noise():
  output = ("step 10 loss 2.1\nTraceback (most recent call last):\n  File ...\n"
            "FloatingPointError: loss is nan at step 12; run stopped\n\nI0000 some shutdown log\n")
  assert sweep.error_line(output, 1) == "FloatingPointError: loss is nan at step 12; run stopped"
  assert sweep.error_line("Config error: config.seed='x' must be of type int\n", 1) == (
      "Config error: config.seed='x' must be of type int")
  assert sweep.error_line("step 3\n", -9) == "killed by SIGKILL"
  # experiments.train's own one-line errors.
  for line in ("Diverged: loss is nan at step 12; run stopped, nothing saved after it (last "
               "checkpoint: step 10)", "Run error: runs/x is in use by pid 7 on host h",
               "Checkpoint error: no checkpoint of runs/x is readable"):
    assert sweep.error_line(f"step 10 loss 2.1\n{line}\n", 3) == line


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_sweep_runs_members_records_a_failure_tables_results_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # members train on one CPU device
  path = write_sweep(tmp_path, {
      "base": "configs/vit.py", "fixed": TINY,
      "members": [{"config_arg": "switch"}, {"config_arg": "dense"},
                  # Fails as it trains: a config error would stop the whole sweep first.
                  {"config_arg": "switch", "train.learning_rate": 1e9}]})
  workdir = tmp_path / "runs"
  done = subprocess.run([sys.executable, "-m", "experiments.sweep", "--sweep", path,
                         "--workdir", str(workdir), "--parallel", "2"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stdout + done.stderr  # a member failed
  error = ("Diverged: loss is nan at step 3; run stopped, nothing saved after it (no checkpoint "
           "yet: a rerun starts from step 0)")
  assert f"switch,learning_rate=1e+09: {error}" in done.stdout

  results = pd.read_csv(workdir / "results.csv")
  assert list(results.columns) == [
      "name", "config_arg", "train.learning_rate", "group", "seed", "status", "eval/loss",
      "eval/accuracy", "train/task_loss", "tokens_per_s", "cpu_share", "contended", "load_avg",
      "wall_seconds", "train_flops", "active_params", "total_params", "active_flops_per_token",
      "dropped_fraction", "experts_per_token", "load_cv", "max_violation", "max_logit",
      "error"]
  assert list(results["name"]) == ["switch", "dense", "switch,learning_rate=1e+09"]
  assert list(results["status"]) == ["finished", "finished", "failed"]
  assert list(results["group"]) == ["switch", "dense", "switch, learning_rate=1000000000.0"]
  assert list(results["seed"]) == [0, 0, 0]
  assert results["error"].iloc[2].startswith(error)
  for _, row in results.iloc[:2].iterrows():
    final = json.load(open(workdir / row["name"] / "final_metrics.json"))
    assert row["eval/accuracy"] == pytest.approx(final["eval"]["eval/accuracy"])
    assert row["eval/loss"] == pytest.approx(final["eval"]["eval/loss"])
    assert row["train/task_loss"] == pytest.approx(final["train"]["train/task_loss"])
    for key in ("active_params", "total_params", "active_flops_per_token"):
      assert row[key] == final["model"][key]
    records = [r for r in read_jsonl(workdir / row["name"] / "metrics.jsonl")
               if "train/loss" in r]
    speeds = [r["tokens_per_s"] for r in records]
    assert len(speeds) == 5 and row["tokens_per_s"] == pytest.approx(np.median(speeds[1:]))
    assert 0 < row["cpu_share"] <= 1.05
    assert row["cpu_share"] == pytest.approx(np.median([r["cpu_share"] for r in records[1:]]))
    assert row["load_avg"] == pytest.approx(np.median([r["load_avg"] for r in records[1:]]))
    # Training time from each interval's steps and rate; inside the member's whole run.
    steps = np.diff([0] + [r["step"] for r in records])
    assert row["wall_seconds"] == pytest.approx(
        sum(n / r["steps_per_s"] for n, r in zip(steps, records)))
    assert 0 < row["wall_seconds"] < json.load(open(workdir / row["name"] / "status.json"))[
        "seconds"]
    # forward + backward = 3 forwards of blocks and head, 10 steps of 32 images of 49 patches
    # and a class token.
    model = final["model"]
    assert row["train_flops"] == pytest.approx(
        3 * (model["active_flops_per_token"] + model["head_flops_per_token"]) * 10 * 32 * 50)
  finished = results.iloc[:2]
  typical = finished["cpu_share"].median()
  assert list(results["contended"]) == [
      *((finished["cpu_share"] < 0.8 * typical) | (finished["cpu_share"] > typical / 0.8)), False]
  assert np.isnan(results["cpu_share"].iloc[2]) and np.isnan(results["wall_seconds"].iloc[2])
  switch, dense = results.iloc[0], results.iloc[1]
  last_train = json.load(open(workdir / "switch" / "final_metrics.json"))["train"]
  for stat in sweep.MOE_STATS:  # one MoE layer: block_1
    assert switch[stat] == pytest.approx(last_train[f"train/routing/block_1/moe/{stat}"])
    assert np.isnan(dense[stat])
  assert dense["active_params"] == dense["total_params"] < switch["total_params"]

  # One seed per group: the summary says so instead of an interval, against the first group.
  summary = pd.read_csv(workdir / "summary.csv")
  accuracy = summary[summary.metric == "eval/accuracy"].set_index("group")
  assert list(accuracy.index) == ["switch", "dense", "switch, learning_rate=1000000000.0"]
  assert list(accuracy["n"]) == [1, 1, 0] and set(accuracy["baseline"]) == {"switch"}
  assert accuracy.loc["dense", "verdict"] == "one seed: no interval"
  assert accuracy.loc["dense", "diff"] == pytest.approx(
      results["eval/accuracy"].iloc[1] - results["eval/accuracy"].iloc[0])
  assert "one seed: no interval" in done.stdout and f"Summary: {workdir}/summary.csv" in done.stdout

  failed = workdir / "switch,learning_rate=1e+09"
  status = json.load(open(failed / "status.json"))
  assert status["status"] == "failed" and status["error"].startswith(error)
  assert error in (failed / "train.log").read_text()
  members = json.load(open(workdir / "sweep.json"))["members"]
  assert [m["name"] for m in members] == list(results["name"])

  # Resume: finished members are left alone, the failed one runs again.
  logs = {name: (workdir / name / "train.log").read_text() for name in ("switch", "dense")}
  finished_at = {name: os.path.getmtime(workdir / name / "final_metrics.json") for name in logs}
  messages = []
  again = sweep.run_sweep(sweep.load_sweep(path), str(workdir), log=messages.append)
  assert messages[0] == "2 of 3 members finished before; running 1, 1 at a time"
  assert messages[1] == "started  switch,learning_rate=1e+09" and len(messages) == 3
  assert messages[2].startswith("switch,learning_rate=1e+09: FAILED after ")
  assert error in messages[2]
  assert {name: (workdir / name / "train.log").read_text() for name in logs} == logs
  assert {name: os.path.getmtime(workdir / name / "final_metrics.json")
          for name in logs} == finished_at
  headers = [line for line in (failed / "train.log").read_text().splitlines()
             if line.startswith("# ") and "experiments.train" in line]
  assert len(headers) == 2  # one per attempt, the first attempt's output kept
  assert list(again["status"]) == ["finished", "finished", "failed"]


def test_a_member_that_ran_alone_in_a_parallel_sweep_is_flagged():
  """--parallel 2, measured: five members at a CPU share of about 0.5, the last alone at 0.88."""
  shares = [0.49, 0.50, 0.50, 0.50, 0.49, 0.88]
  results = pd.DataFrame({"name": [f"m{i}" for i in range(6)], "status": ["finished"] * 6,
                          "cpu_share": shares, "load_avg": [2.0] * 5 + [1.1]})
  results["contended"] = sweep.flag_contended(results)
  assert list(results["contended"]) == [False] * 5 + [True]  # 0.88 > 0.5 / 0.8
  assert sweep.contention_warnings(results) == [
      "m5 had a CPU share of 88% (the sweep's median: 50%; load average 1.1): it had more of the "
      "machine than the other members (fewer ran beside it), so its tokens/s and wall-clock time "
      "are left out of the comparisons."]


def test_members_with_a_low_cpu_share_are_flagged_and_left_out_of_speed_comparisons():
  results = pd.DataFrame({
      "name": ["dense,seed=0", "topk,seed=0", "dense,seed=1", "topk,seed=1", "topk,seed=2"],
      "group": ["dense", "topk", "dense", "topk", "topk"], "seed": [0, 0, 1, 1, 2],
      "status": ["finished"] * 4 + ["failed"],
      "eval/accuracy": [0.70, 0.72, 0.71, 0.74, np.nan],
      "tokens_per_s": [40000.0, 36000.0, 20000.0, 37000.0, np.nan],
      "wall_seconds": [30.0, 33.0, 61.0, 32.0, np.nan],
      "cpu_share": [0.95, 0.93, 0.45, 0.97, np.nan], "load_avg": [2.1, 2.0, 4.2, 2.2, np.nan]})
  # The median share of the finished members is 0.94: dense,seed=1 (0.45) is below 0.8 x 0.94;
  # 0.97 is below 0.94 / 0.8.
  results["contended"] = sweep.flag_contended(results)
  assert list(results["contended"]) == [False, False, True, False, False]
  assert sweep.contention_warnings(results) == [
      "dense,seed=1 had a CPU share of 45% (the sweep's median: 94%; load average 4.2): other "
      "work on the machine slowed it, so its tokens/s and wall-clock time are left out of the "
      "comparisons."]
  summary = sweep.summarize(results, {"baseline": None}).set_index(["group", "metric"])
  assert summary.loc[("dense", "tokens_per_s"), "n"] == 1  # seed 1's throughput left out
  assert summary.loc[("dense", "eval/accuracy"), "n"] == 2  # its quality kept
  speed = sweep.relative_speed(results, {"baseline": None}).set_index("group")
  assert speed.loc["topk", "n_diff"] == 1
  assert speed.loc["topk", "ratio"] == pytest.approx(36000 / 40000)


def wait_for(condition, seconds=120):
  """Polls until condition() holds or the time is up (the asserts after it say what failed)."""
  deadline = time.time() + seconds
  while not condition() and time.time() < deadline:
    time.sleep(0.05)


def test_a_killed_sweep_takes_its_running_member_with_it(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  path = write_sweep(tmp_path, {"base": "configs/vit.py",
                                "fixed": {**TINY, "train.num_steps": 100000},
                                "members": [{"config_arg": "switch"}]})
  workdir = tmp_path / "runs"
  runner = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--sweep", path,
                             "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  member = str(workdir / "switch")
  wait_for(lambda: runlock.holder(member) is not None)
  assert runlock.holder(member).startswith("pid ")
  runner.kill()  # SIGKILL: the runner cannot stop its member itself
  runner.wait()
  wait_for(lambda: runlock.holder(member) is None)
  assert runlock.holder(member) is None  # the member's process is gone, its lock released
  assert "Interrupted" in (workdir / "switch" / "train.log").read_text()  # stopped cleanly


def test_a_rerun_waits_for_a_member_that_another_process_trains(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  definition = sweep.load_sweep(write_sweep(tmp_path, {
      "base": "configs/vit.py", "fixed": TINY, "members": [{"config_arg": "switch"}]}))
  workdir = tmp_path / "runs"
  members = sweep.expand(definition, str(workdir))
  os.makedirs(workdir / "switch")
  # Another process holds the member's lock for a moment, as a live trainer would.
  other = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom moe_jax import runlock\n"
       "lock = runlock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(2)",
       str(workdir / "switch")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert other.stdout.readline() == "locked\n"
  messages = []
  sweep.run_members(members, str(workdir), log=messages.append)
  assert other.wait() == 0
  assert messages[:3] == [
      "0 of 1 members finished before; running 1, 1 at a time",
      f"switch: already running (pid {other.pid} on host {socket.gethostname()}); waiting for it",
      "started  switch"]
  assert messages[3].startswith("switch: finished in ") and len(messages) == 4
