"""Train one experiment from a config file.

  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch
  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_gshard \
      --config.model.moe.router=gshard --config.train.num_steps=500

Running the same command again resumes from the workdir's latest checkpoint.

Multi-host: start one process per host with the same command plus either `--distributed`
(jax.distributed.initialize() detects SLURM, TPU pods, Kubernetes and other clusters) or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. All processes share the
workdir (a shared filesystem); each reads its own slice of every batch; process 0 writes metrics.
"""
import re
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from moe_jax import train
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


def parse_flags(argv):
  """absl's flag parsing, with a one-line "Config error: ..." where the config file raises or a
  --config.FIELD override names no field (ml_collections raises both while flags are parsed)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    text = str(error)
    if "Traceback" not in text:  # unknown flag, missing --workdir, bad value: absl's message
      sys.exit(f"FATAL Flags parsing error: {text}\n"
               "Pass --helpshort or --helpfull to see help on flags.")
    from moe_jax.sweep import error_line  # only on this error path: sweep imports pandas
    # The config file raised: its exception's own line, without the exception's name.
    sys.exit(f"Config error: {error_line(text, 1).split(': ', 1)[-1]}")
  except (KeyError, AttributeError) as error:
    text = " ".join(str(error.args[0] if error.args else error).replace("\\'", "'").split())
    name = re.search(r"'(\w+)'", text)
    override = next((arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.") and name
                     and name.group(1) in arg.split("=")[0].split(".")), "an override")
    hint = text[text.find("Did you mean"):].rstrip("'") if "Did you mean" in text else ""
    sys.exit(f"Config error: {override}: no such config field. {hint}".strip())


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
  except OSError as error:  # its cause's last line says why
    sys.exit(f"Config error: {str(error.__cause__ or error).strip().splitlines()[-1].strip()}")
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as error:
    sys.exit(f"Config error: {error}")
  if jax.process_index() == 0:
    print(f"Finished: {final['eval']}\nMetrics: {_WORKDIR.value}/metrics.jsonl")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
