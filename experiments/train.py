"""Train one experiment from a config file.

  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch
  python -m experiments.train --config configs/vit_switch.py --workdir runs/vit_gshard \
      --config.model.moe.router=gshard --config.train.num_steps=500

Running the same command again resumes from the workdir's latest checkpoint.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax import train
from moe_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS narrate every step at INFO
  try:
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as error:
    sys.exit(f"Config error: {error}")
  print(f"Finished: {final['eval']}\nMetrics: {_WORKDIR.value}/metrics.jsonl")


if __name__ == "__main__":
  app.run(main)
