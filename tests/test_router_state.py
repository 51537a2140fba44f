"""The routers' state collection (routers.STATE, 'router_state'): checkpoints written while it was
named 'router_bias' restore, in training and in analysis."""
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp

from moe_jax import analysis, routers, train
from tests.test_train import loss_free_config, restored_state, train_losses


def write_legacy(workdir, step):
  """Rewrites checkpoint `step` of `workdir` as it was written before the rename: its router
  state under 'router_bias'."""
  state = restored_state(workdir, step)
  legacy = {("router_bias" if key == routers.STATE else key): value
            for key, value in state.items()}
  item = workdir / "checkpoints" / str(step) / "state"
  shutil.rmtree(item)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(item, legacy)


def test_a_checkpoint_with_the_old_collection_name_resumes_as_an_uninterrupted_run(tmp_path):
  config = loss_free_config()
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, resumed)  # as if killed after step 3, by a run of the old code
  shutil.rmtree(resumed / "checkpoints" / "6")
  os.remove(resumed / "final_metrics.json")
  write_legacy(resumed, 3)
  assert "router_bias" in restored_state(resumed, 3)

  # analysis reads it under today's name
  variables = analysis.restore_variables(resumed, 3)
  np.testing.assert_array_equal(
      variables[routers.STATE]["block_1"]["moe"]["router"]["bias"],
      restored_state(straight, 3)[routers.STATE]["block_1"]["moe"]["router"]["bias"])

  train.train_and_evaluate(config, str(resumed))
  assert train_losses(straight) == train_losses(resumed)
  finals = [json.load(open(d / "final_metrics.json")) for d in (straight, resumed)]
  assert finals[0]["eval"] == finals[1]["eval"]
  biases = [restored_state(d, 6)[routers.STATE]["block_1"]["moe"]["router"]["bias"]
            for d in (straight, resumed)]
  np.testing.assert_array_equal(biases[0], biases[1])
  assert np.abs(biases[0]).max() > 0
