"""Bad inputs a researcher types and faults a run meets (issue #32): each ends with one line that
names the field or file and what to do, before anything compiles; faults lose nothing more than
the checkpoint being written."""
import contextlib
import os
import re
import subprocess
import sys

from absl import flags
import pytest

from configs import common
from experiments import sweep as sweep_cli
from experiments import train as train_cli
from moe_jax import config as config_lib
from moe_jax import routers, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = "configs/vit_switch.py"


def config_file(tmp_path, text):
  path = tmp_path / "my_config.py"
  path.write_text(text)
  return str(path)


def cli_line(monkeypatch, args):
  """What `python -m experiments.train ARGS` stops with while parsing its flags (in-process:
  the config flag reads its overrides from sys.argv)."""
  argv = ["train", *args]
  monkeypatch.setattr(sys, "argv", argv)
  try:
    with pytest.raises(SystemExit) as stop:
      train_cli.parse_flags(argv)
  finally:
    flags.FLAGS.unparse_flags()
  return stop.value.code


@pytest.mark.parametrize("text,arg,line", [
    ("def get_config(:\n  pass\n", "", "{path}, line 1: invalid syntax"),
    ("def get_config():\n  raise RuntimeError('no such preset')\n", "",
     "{path}: RuntimeError: no such preset"),
    ("import no_such_module\n", "",
     "{path}: ModuleNotFoundError: No module named 'no_such_module'"),
    ("def get_config():\n  return {'seed': 1}\n", "",
     "{path}: get_config() returned dict, not an ml_collections.ConfigDict; start from "
     "moe_jax.config.default_config() (see configs/vit_switch.py)"),
    ("CONFIG = None\n", "", "{path}: defines no get_config(); a config file returns its "
                            "ConfigDict from get_config() (see configs/vit_switch.py)"),
    ("def get_config():\n  return None\n", "",
     "{path}: get_config() returned NoneType, not an ml_collections.ConfigDict; start from "
     "moe_jax.config.default_config() (see configs/vit_switch.py)"),
    ("from moe_jax.config import default_config\ndef get_config():\n  return default_config()\n",
     ":topk", "{path}: TypeError: get_config() takes 0 positional arguments but 1 was given"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, monkeypatch, text, arg, line):
  path = config_file(tmp_path, text)
  expected = line.format(path=path)
  with pytest.raises(config_lib.ConfigError) as error:  # as a sweep checks its members
    config_lib.load_config([f"--config={path}{arg}", "--config.seed=1"])
  assert str(error.value) == expected
  assert cli_line(monkeypatch, [f"--config={path}{arg}", f"--workdir={tmp_path}/run"]) == (
      "Config error: " + expected)
  assert os.listdir(tmp_path) == ["my_config.py"]  # nothing written


@pytest.mark.parametrize("args,line", [
    (["--config.seed=1", "--workdir=run"],
     "--config.seed=1 overrides a field of a config file, but no --config=FILE is given"),
    (["--workdir=run"],
     "--config needs a value: --config=FILE, the experiment's config (configs/vit_switch.py, "
     "say)"),
    ([f"--config={SWITCH}", "--workdir"],
     "--workdir needs a value: --workdir=DIR, the run's directory (runs/vit_switch, say)"),
    ([f"--config={SWITCH}"],
     "--workdir needs a value: --workdir=DIR, the run's directory (runs/vit_switch, say)"),
    ([f"--config={SWITCH}", "--wrkdir=run"],
     "Unknown command line flag 'wrkdir'. Did you mean: workdir ?; --helpshort lists the flags"),
])
def test_a_missing_flag_or_value_is_one_line_without_absl_help_hint(monkeypatch, args, line):
  assert cli_line(monkeypatch, args) == "Config error: " + line


def check(change, workdir="run"):
  """The ConfigError line of train.check_config (what experiments.train prints after "Config
  error: ") for the ViT Switch config after `change`."""
  config = common.vit("switch")
  change(config)
  with pytest.raises(config_lib.ConfigError) as error:
    train.check_config(config, str(workdir))
  return str(error.value)


@pytest.mark.parametrize("change,line", [
    (lambda c: c.model.moe.update(group_size=0),
     "config.model.moe.group_size=0 must be >= 1, or None (from the einsum cost model)"),
    (lambda c: c.model.moe.update(group_size=-50),
     "config.model.moe.group_size=-50 must be >= 1, or None (from the einsum cost model)"),
    (lambda c: c.mesh.update(model=0),
     "config.mesh.model=0 must be >= 1, or -1 (the devices left over)"),
    (lambda c: c.mesh.update(expert=-2),
     "config.mesh.expert=-2 must be >= 1, or -1 (the devices left over)"),
    (lambda c: c.mesh.update(expert=-1),
     "config.mesh.data and config.mesh.expert are both -1 (the devices left over): give one of "
     "them a size"),
    (lambda c: c.mesh.update(data=3),
     "config.mesh sizes data=3, expert=1, model=1 do not fit the 8 devices: their product must "
     "be 8, or divide it with one size -1"),
    # Beyond the list: what else a researcher gets wrong in routers, meshes, data,
    # trace and upcycle paths (each was a traceback, or accepted until it crashed later).
    (lambda c: c.mesh.update(rules=(("expert", "experts"),)),
     "config.mesh.rules=(('expert', 'experts'),) must be (logical axis, mesh axis) pairs, each "
     "mesh axis one of 'data', 'expert', 'model', None"),
    (lambda c: c.model.moe.update(layers=("1",)),
     "config.model.moe.layers=('1',) must be a tuple of ints"),
    (lambda c: c.model.moe.update(experts_per_layer=("8", "8")),
     "config.model.moe.experts_per_layer=('8', '8') must be a tuple of ints"),
    (lambda c: c.model.update(num_heads=0), "config.model.num_heads=0 must be >= 1"),
    (lambda c: c.model.update(width=0), "config.model.width=0 must be >= 1"),
    (lambda c: c.model.update(mlp_dim=0), "config.model.mlp_dim=0 must be >= 1"),
    (lambda c: c.model.update(patch_size=0),
     "config.model.patch_size=0 must divide the image size 28x28"),
    (lambda c: c.train.update(b2=1.5),
     "config.train.b2=1.5 must be in [0, 1) (Adam's decay rates)"),
    (lambda c: c.train.update(learning_rate=float("nan")),
     "config.train.learning_rate=nan must be > 0"),
    (lambda c: c.data.update(data_dir=__file__),
     f"config.data.data_dir={__file__!r} is a file, not a directory"),
    (lambda c: c.model.moe.update(router="top_k"),
     "config.model.moe.router='top_k' is unknown; allowed: {routers}"),
    (lambda c: c.model.moe.update(router_module="my_routers"),
     "config.model.moe.router_module='my_routers' does not import: No module named "
     "'my_routers'"),
    (lambda c: c.train.update(replay_from="runs/nope"),
     "config.train.replay_from='runs/nope' is not a directory"),
    (lambda c: c.train.update(upcycle_from="runs/nope"),
     "config.train.upcycle_from='runs/nope' holds no checkpointed run (config.json and "
     "checkpoints/)"),
])
def test_a_bad_field_is_one_line(change, line):
  assert check(change) == line.format(routers=", ".join(map(repr, routers.names())))


@pytest.mark.parametrize("text,line", [
    ("{'base': 'configs/vit.py', 'grid': {'seed': 0}}",
     "grid key 'seed' must list its values, [0], got 0"),
    ("{'base': 'configs/vit.py', 'grid': {'model.moe.router': 'topk'}}",
     "grid key 'model.moe.router' must list its values, ['topk'], got 'topk'"),
    ("{'base': 'configs/vit.py', 'grid': [('seed', [0, 1])]}",
     "'grid' must be a dict of value lists, {'model.moe.k': [1, 2]}, got [('seed', [0, 1])]"),
    ("{'base': 'configs/vit.py', 'fixed': ['train.num_steps=5'], 'grid': {'seed': [0]}}",
     "'fixed' must be a dict of overrides, {'train.num_steps': 150}, got ['train.num_steps=5']"),
    ("{'base': 'configs/vit.py', 'members': {'model.moe.k': 1}}",
     "'members' must be a list of dicts of overrides, [{'model.moe.k': 1}, ...], got "
     "{'model.moe.k': 1}"),
])
def test_a_sweep_file_of_the_wrong_shape_is_one_line(tmp_path, text, line):
  path = tmp_path / "my_sweep.py"
  path.write_text(f"def get_sweep():\n  return {text}\n")
  with pytest.raises(SystemExit) as stop:
    sweep_cli.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs")])
  assert stop.value.code == f"Sweep error: {path}: {line}"


@pytest.mark.parametrize("workdir,line", [
    ("", "--workdir='' is not a directory name: give the run's directory, --workdir=DIR"),
    ("--config.seed=1", "--workdir='--config.seed=1' is not a directory name: give the run's "
                        "directory, --workdir=DIR"),
])
def test_a_workdir_that_is_no_name_is_one_line(workdir, line):
  assert check(lambda c: None, workdir) == line


def sweep_line(tmp_path, definition):
  """What `python -m experiments.sweep` stops with for this sweep definition (in-process)."""
  path = tmp_path / "my_sweep.py"
  path.write_text(f"def get_sweep():\n  return {definition!r}\n")
  with pytest.raises(SystemExit) as stop:
    sweep_cli.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs")])
  assert not (tmp_path / "runs").exists()  # no member started, nothing written
  return stop.value.code


@pytest.mark.parametrize("definition,line", [
    ({"base": SWITCH, "grid": {"model.moe.rooter": ["topk"]}},
     "member rooter=topk: --config.model.moe.rooter: no such config field. Did you mean "
     "\"router\" instead of \"rooter\"? (no member started)"),
    ({"base": SWITCH, "grid": {"model.moe.k": [0, 9]}},
     "member k=0: config.model.moe.k=0 must be in [1, num_experts=8] (no member started; 2 of 2 "
     "members would stop: --dry-run lists each)"),
    ({"base": SWITCH, "grid": {"model.moe.num_experts": ["eight"]}},
     "member num_experts=eight: --config.model.moe.num_experts=eight: invalid literal for int() "
     "with base 10: 'eight' (no member started)"),
    ({"base": "configs/nope.py", "grid": {"seed": [0, 1]}},
     "member seed=0: [Errno 2] No such file or directory: 'configs/nope.py' (no member started; "
     "2 of 2 members would stop: --dry-run lists each)"),
    ({"base": SWITCH, "grid": {"model.moe.router": ["switch", "swich"]}},
     "member router=swich: config.model.moe.router='swich' is unknown; allowed: {routers} (no "
     "member started)"),
    ({"base": "configs/vit.py", "fixed": {"train.num_steps": 20},
      "grid": {"config_arg": ["dense", "topk"], "train.warmup_steps": [2, 40]}},
     "member dense,warmup_steps=40: config.train.warmup_steps=40 must be in [0, num_steps=20] or "
     "None (a tenth of num_steps: 2) (no member started; 2 of 4 members would stop: --dry-run "
     "lists each)"),
])
def test_a_sweep_with_a_bad_member_starts_none_and_says_which_in_one_line(tmp_path, definition,
                                                                          line):
  assert sweep_line(tmp_path, definition) == "Sweep error: " + line.format(
      routers=", ".join(map(repr, routers.names())))


def test_a_sweep_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "runs").write_text("notes")
  with pytest.raises(SystemExit) as stop:
    sweep_cli.main(["--sweep", "configs/sweeps/routers.py", "--workdir", str(tmp_path / "runs")])
  assert stop.value.code == f"Sweep error: --workdir={tmp_path / 'runs'} is a file, not a directory"


@contextlib.contextmanager
def small_disk(path, size, read_only=False):
  """A tmpfs of `size` at `path` (the tests run as root, as `make test` does): a real full disk,
  and a real read-only one."""
  os.makedirs(path)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""),
                  "tmpfs", str(path)], check=True)
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_workdir_is_one_line(tmp_path):
  with small_disk(tmp_path / "ro", "1m", read_only=True) as workdir:
    assert check(lambda c: None, workdir) == (
        f"--workdir={workdir} is not writable: give write permission or another --workdir")


TINY_SWITCH = {"model.num_layers": 2, "model.width": 32, "model.num_heads": 2,
               "model.moe.group_size": 100, "train.batch_size": 32, "train.num_steps": 30,
               "train.warmup_steps": 5, "train.log_every": 10, "train.eval_every": 30,
               "train.eval_max_batches": 1, "train.checkpoint_every": 10}  # checkpoints: 3.2 MB


def disk_usage(path):
  return sum(os.lstat(os.path.join(root, name)).st_blocks * 512
             for root, _, names in os.walk(path) for name in names)


def test_a_full_disk_keeps_the_last_checkpoint_says_what_the_run_needs_and_resumes(tmp_path,
                                                                                   capsys):
  with small_disk(tmp_path / "disk", "6m") as disk:  # room for one checkpoint, not two
    workdir = disk / "run"
    done = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={SWITCH}",
                           f"--workdir={workdir}",
                           *(f"--config.{key}={value}" for key, value in TINY_SWITCH.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    size = disk_usage(workdir / "checkpoints" / "10")
    assert done.returncode == 6, done.stderr
    # One line: no orbax tracebacks, no asyncio "Event loop is closed" from its pending writes.
    assert re.fullmatch(
        f"Checkpoint error: no space left on device in {re.escape(str(workdir))} saving step 20 "
        r"\(free: \d+\.\d MB\): the run needs about "
        f"{4 * size / 2**20:.1f} MB there for its checkpoints \\(4 of {size / 2**20:.1f} MB: "
        r"keep_checkpoints=3 and the one being written\); the partial checkpoint was removed, "
        r"step 10 kept: free space and run the same command to resume\n", done.stderr)
    assert all(line.startswith(("Model: ", "step ")) for line in done.stdout.splitlines())
    assert os.listdir(workdir / "checkpoints") == ["10"]  # 20.orbax-checkpoint-tmp removed
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    config = common.vit("switch")
    config.update_from_flattened_dict(TINY_SWITCH)
    final = train.train_and_evaluate(config, str(workdir))
    assert capsys.readouterr().out.splitlines()[0] == f"Resumed from step 10 of {workdir}"
    assert final["step"] == 30  # and the metrics of the run that met the full disk at step 20
    assert done.stdout.splitlines()[-1] == "step     30  " + "  ".join(
        f"{key} {final['eval'][key]:.4f}" for key in ("eval/loss", "eval/accuracy"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "30"]


def test_a_corrupt_newest_checkpoint_prints_the_fallback_line_and_nothing_else(tmp_path):
  """The fallback is tests/test_train.py's; here the whole output of the command: orbax's
  pending reads after the failed one printed asyncio tracebacks (checkpoints._run_sync_draining)."""
  config = common.vit("switch")
  config.update_from_flattened_dict({**TINY_SWITCH, "train.num_steps": 20})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  os.remove(workdir / "final_metrics.json")
  for path in (workdir / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d").iterdir():
    os.truncate(path, 100)  # every array file: many reads fail while others are pending
  done = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={SWITCH}",
                         f"--workdir={workdir}",
                         *(f"--config.{key}={value}" for key, value in TINY_SWITCH.items()
                           if key != "train.num_steps"), "--config.train.num_steps=20"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert (done.returncode, done.stderr) == (0, "")
  lines = done.stdout.splitlines()
  assert re.fullmatch(r"Checkpoint step 20 is unreadable \([A-Z_]+: Error reading .*\); "
                      f"moved to {re.escape(str(workdir / 'checkpoints_unreadable' / '20'))}",
                      lines[0])
  assert lines[1] == f"Resumed from step 10 of {workdir}"
  assert [line.split(" ", 1)[0] for line in lines[2:]] == [
      "Model:", "step", "step", "Finished:", "Metrics:"]


def test_a_damaged_replay_trace_is_one_line(tmp_path):
  (tmp_path / "trace").mkdir()
  (tmp_path / "trace" / "step_1.npz").write_bytes(b"PK\x03\x04 cut short")
  line = check(lambda c: c.train.update(replay_from=str(tmp_path), num_steps=1, warmup_steps=0))
  assert line == (f"config.train.replay_from={str(tmp_path)!r}: {tmp_path}/trace/step_1.npz is "
                  "not a readable trace (BadZipFile: File is not a zip file); trace step 1 again")


def test_upcycling_from_a_damaged_dense_checkpoint_is_one_line(tmp_path):
  dense, moe = common.vit("dense"), common.vit("switch")
  for config in (dense, moe):
    config.update_from_flattened_dict({**TINY_SWITCH, "model.mlp_dim": 64, "train.num_steps": 2,
                                       "train.warmup_steps": 1, "train.checkpoint_every": 2})
  train.train_and_evaluate(dense, str(tmp_path / "dense"))
  for path in (tmp_path / "dense" / "checkpoints" / "2" / "state" / "ocdbt.process_0" /
               "d").iterdir():  # every array file: which ones hold the params varies
    os.truncate(path, 100)
  moe.model.moe.expert_hidden_dim = 64  # each expert a copy of the dense MLP
  moe.train.upcycle_from = str(tmp_path / "dense")
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(moe, str(tmp_path / "moe"))
  assert re.fullmatch(f"config.train.upcycle_from={re.escape(repr(str(tmp_path / 'dense')))}: "
                      r"its latest checkpoint does not restore \([A-Z_]+: Error reading .*\)",
                      str(error.value)), str(error.value)
