"""Whole runs across device layouts and processes, through the entry point (subprocesses)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small ViT with 8 experts per MoE layer and a constant learning rate, so that a run can be
# continued to more steps and still follow the same trajectory.
BASE = [sys.executable, "-m", "experiments.train", "--config", "configs/vit_gshard.py",
        "--config.model.num_layers=2", "--config.model.width=32", "--config.model.num_heads=2",
        "--config.train.batch_size=32", "--config.model.moe.group_size=200",
        "--config.train.warmup_steps=0", "--config.train.end_learning_rate_fraction=1.0",
        "--config.train.log_every=5", "--config.train.eval_every=100",
        "--config.train.eval_max_batches=2", "--config.train.checkpoint_every=5"]
EXPERT_PARALLEL = ["--config.mesh.data=2", "--config.mesh.expert=4"]


def launch(workdir, steps, devices, extra=(), process=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}")
  args = BASE + [f"--workdir={workdir}", f"--config.train.num_steps={steps}", *extra]
  if process is not None:
    args += [f"--coordinator_address=localhost:{process[0]}", "--num_processes=2",
             f"--process_id={process[1]}"]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(*procs):
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output


def final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


def test_checkpoint_restores_across_device_layouts(tmp_path):
  """8 devices (data=2 x expert=4) -> 1 device and back: the same losses as never switching."""
  straight, down, up = tmp_path / "straight", tmp_path / "down", tmp_path / "up"
  # Two waves of independent runs: their starts and compilations overlap.
  finish(launch(straight, 20, 8, EXPERT_PARALLEL), launch(down, 10, 8, EXPERT_PARALLEL),
         launch(up, 10, 1))
  finish(launch(down, 20, 1),  # resumes step 10 on one device
         launch(up, 20, 8, EXPERT_PARALLEL))  # resumes step 10 sharded over 8 devices
  expected = final(straight)
  for run in (down, up):
    got = final(run)
    assert got["step"] == 20
    np.testing.assert_allclose(got["train"]["train/loss"], expected["train"]["train/loss"],
                               rtol=1e-4)
    np.testing.assert_allclose(got["eval"]["eval/loss"], expected["eval"]["eval/loss"],
                               rtol=1e-4)


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 CPU devices (gloo over localhost) = 1 process x 8 devices."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one, two = tmp_path / "one", tmp_path / "two"
  finish(launch(one, 10, 8, EXPERT_PARALLEL))
  finish(*[launch(two, 10, 4, EXPERT_PARALLEL, process=(port, i)) for i in range(2)])
  expected, got = final(one), final(two)
  np.testing.assert_allclose(got["train"]["train/loss"], expected["train"]["train/loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(got["eval"]["eval/loss"], expected["eval"]["eval/loss"], rtol=1e-5)
  with open(two / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [0, 5, 10, 10]  # written once (by process 0): model, 2 train, 1 eval record
  data_states = [f for f in os.listdir(two / "checkpoints" / "10" / "data") if "process" in f]
  assert sorted(data_states) == ["process_0-of-2.json", "process_1-of-2.json"]
