"""Train one experiment from a config file.

  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch
  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_gshard \
      --config.model.moe.router=gshard --config.train.num_steps=500

Running the same command again resumes from the workdir's latest checkpoint. One process at a
time trains in a workdir (moe_jax/runlock.py); SIGTERM stops a run like Ctrl-C (a pending
checkpoint save completes).

Every failure the user can act on is one line on stderr, with its exit code:
  1  Config error: a config, override, dataset or workdir that cannot run (before anything
     compiles or is written)
  3  Diverged: a non-finite loss (the last checkpoint stays good)
  4  Run error: another live process trains in this workdir (its pid and host named)
  5  Checkpoint error: no checkpoint of the run is readable
  6  Checkpoint error: no space left on device (how much the run needs; the partial checkpoint
     removed, the last complete one kept: run the same command to resume)
  130 interrupted (run the same command to resume)

Multi-host: start one process per host with the same command plus either `--distributed`
(jax.distributed.initialize() detects SLURM, TPU pods, Kubernetes and other clusters) or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. All processes share the
workdir (a shared filesystem); each reads its own slice of every batch; process 0 writes metrics.
"""
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from moe_jax import checkpoints, runlock, train
from moe_jax import config as config_lib
from moe_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialize jax.distributed with the cluster's auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


EXIT_DIVERGED, EXIT_BUSY, EXIT_NO_CHECKPOINT, EXIT_DISK_FULL = 3, 4, 5, 6


def fail(code: int, line: str):
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing, with a one-line "Config error: ..." for a config file that does not load
  or raises (config.check_config_file), an override that names no field or has a wrong type
  (config.flag_error), and absl's own errors (a missing flag or value: its line and what to do,
  without absl's "Pass --helpshort" line). The router module an override names is imported
  first (config.import_router_modules)."""
  try:
    config_lib.import_router_modules(argv[1:])  # before the config file names its router
  except ValueError as error:
    sys.exit(f"Config error: {error}")
  try:
    config_lib.check_config_file(argv[1:])
    return flags.FLAGS(argv)
  except ConfigError as error:
    sys.exit(f"Config error: {error}")
  except config_lib.FLAG_ERRORS as error:
    line = config_lib.flag_error(error, argv[1:])
    if line is None:
      line = usage_error(error, argv[1:])
    sys.exit(f"Config error: {line}")


def usage_error(error: BaseException, args) -> str:
  """The line for absl's own flag errors: an override without --config, a flag without its
  value, an unknown flag."""
  text = str(error)
  if config_lib.config_argument(args) is None:
    override = next((arg for arg in args if arg.startswith("--config.")), None)
    if override is not None:
      return f"{override} overrides a field of a config file, but no --config=FILE is given"
  for name, what in (("config", "FILE, the experiment's config (configs/vit_switch.py, say)"),
                     ("workdir", "DIR, the run's directory (runs/vit_switch, say)")):
    if f"--{name} must have a value" in text or f"value for flag --{name}" in text:
      return f"--{name} needs a value: --{name}={what}"
  return f"{text.rstrip('.')}; --helpshort lists the flags"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS narrate every step at INFO
  if _DISTRIBUTED.value or _COORDINATOR.value:  # before anything touches a device
    # Cross-process collectives on CPU hosts need gloo; GPU and TPU backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  try:
    config = _CONFIG.value
    config.get("model")  # a config file that did not load raises on first use
  except OSError as error:
    sys.exit(f"Config error: {config_lib.flag_error(error, argv)}")
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as error:
    sys.exit(f"Config error: {error}")
  except FloatingPointError as error:
    fail(EXIT_DIVERGED, f"Diverged: {error}")
  except runlock.Busy as error:
    fail(EXIT_BUSY, f"Run error: {error}")
  except checkpoints.NoReadableCheckpoint as error:
    fail(EXIT_NO_CHECKPOINT, f"Checkpoint error: {error}")
  except checkpoints.DiskFull as error:
    fail(EXIT_DISK_FULL, f"Checkpoint error: {error}")
  except KeyboardInterrupt:
    fail(130, "Interrupted; run the same command to resume from the last checkpoint")
  if jax.process_index() == 0:
    print(f"Finished: {final['eval']}\nMetrics: {_WORKDIR.value}/metrics.jsonl")


if __name__ == "__main__":
  runlock.interrupt_on_sigterm()
  runlock.stop_with_parent()
  app.run(main, flags_parser=parse_flags)
