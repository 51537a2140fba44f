"""Routing trace and replay (moe_jax/trace.py): a layer's recorded decisions are its own,
replaying them reproduces its output, replaying others routes by them; config errors.
The runs that trace and replay through the train loop are in tests/test_analysis.py."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from moe_jax import config as config_lib
from moe_jax import models, routers, train
from moe_jax import trace as trace_lib
from tests.test_microbatches import LM_INFO, lm_batch, tiny_lm


def test_trace_is_the_layers_own_routing_and_replay_routes_by_it():
  """The layer's trace against its own decisions; replays of its own and of other choices
  (topk: 2 of 4 experts, capacity for some of them)."""
  config = tiny_lm("topk")
  config.model.moe.capacity_factor = 0.5
  model = models.get_model(config.model, LM_INFO)
  inputs = lm_batch()["inputs"]
  variables = nn.meta.unbox(train.initial_variables(model, inputs, jax.random.key(0)))

  @jax.jit
  def apply(replay):
    replayed = {} if replay is None else {routers.REPLAY: {"block_0": {"moe": {"router": {
        "choices": replay}}}}}
    logits, sown = model.apply({**variables, **replayed}, inputs, deterministic=False,
                               rngs={"dropout": jax.random.key(0), "routing": jax.random.key(0)},
                               mutable=["intermediates", "losses", routers.TRACE])
    return logits, sown["losses"], sown[routers.TRACE]["block_0"]["moe"], sown[
        "intermediates"]["block_0"]["moe"]["decisions"][0]

  logits, losses, traced, own = jax.device_get(apply(None))
  choices, kept = traced["choices"], traced["kept"]
  assert choices.shape == (8, 8, 2) and choices.dtype == np.int8
  assert 0 < kept.mean() < 1  # capacity dropped some
  one_hot = lambda mask: np.eye(5, dtype=bool)[np.where(mask, choices, 4)].any(axis=2)[..., :4]
  np.testing.assert_array_equal(one_hot(choices < 4), own["selected"])
  np.testing.assert_array_equal(one_hot(kept), own["processed"])

  # Its own choices replayed: the same outputs and losses, bit for bit.
  np.testing.assert_equal(jax.device_get(apply(choices))[:3], (logits, losses, traced))

  # Other choices (random experts; some tokens with one) are the ones routed, gated by the
  # router's probabilities renormalized over them.
  rng = np.random.default_rng(0)
  other = np.argsort(rng.random((8, 8, 4)), axis=-1)[..., :2].astype(np.int8)
  other[..., 1] = np.where(rng.random((8, 8)) < 0.25, 4, other[..., 1])
  replayed = jax.device_get(apply(other))[2]
  np.testing.assert_array_equal(replayed["choices"], other)
  assert not (replayed["kept"] & (other == 4)).any() and replayed["kept"].mean() < 1
  chosen = np.where(other < 4, np.take_along_axis(own["probs"], np.minimum(other, 3), -1), 0)
  np.testing.assert_allclose(replayed["gates"], np.where(
      replayed["kept"], chosen / chosen.sum(axis=-1, keepdims=True), 0), rtol=1e-6)


def vit(router="topk", **train_fields):
  config = common.vit(router)
  config.train.update(**{"num_steps": 4, **train_fields})
  return config


@pytest.mark.parametrize("change,message", [
    (dict(trace_steps=(0, 2)), r"config.train.trace_steps holds 0: steps are ints in \[1, "
                               r"num_steps=4\]$"),
    (dict(trace_every=-1), "config.train.trace_every=-1 must be >= 0$"),
    (dict(router="soft", trace_every=2),
     "config.train.trace_every records the experts each token chooses; router='soft' routes "
     "by 'soft'$"),
    (dict(router="expert_choice", replay_from="x"),
     "config.train.replay_from routes by recorded token choices, which router='expert_choice' "
     "cannot take; allowed: 'switch', 'gshard', 'topk', 'vmoe', "),
    (dict(router="gshard", replay_from="x"),
     r"config.model.moe.gshard.second_expert_policy='random' cannot be replayed \("),
    (dict(router="dense", trace_steps=(1,)), "config.train.trace_steps records or replays MoE "
                                            "routing; config.model.moe.router='dense' has no"),
])
def test_trace_and_replay_config_errors(change, message):
  router = change.pop("router", "topk")
  with pytest.raises(config_lib.ConfigError, match="^" + message):
    config_lib.validate(vit(router, **change), tokens_per_example=50)


def test_replay_needs_a_trace_of_every_step_that_fits_the_run(tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match=f"^config.train.replay_from='{missing}' is "
                                                   "not a directory$"):
    train.check_config(vit(replay_from=missing), str(tmp_path / "run"))
  config = vit(replay_from=str(tmp_path))
  shapes = trace_lib.expected_choices(config, 50, models.layer_plan(
      config.model, {"image_shape": (28, 28, 1), "num_classes": 10}).moe_layers())
  assert shapes == {"block_1/moe": ((32, 200, 2), 8), "block_3/moe": ((32, 200, 2), 8)}
  for step in (1, 2, 4):
    trace_lib.write(str(tmp_path), step, {f"{layer}/choices": np.zeros(shape, np.int8)
                                          for layer, (shape, _) in shapes.items()}, 1)
  assert trace_lib.traced_steps(str(tmp_path)) == [1, 2, 4]
  with pytest.raises(config_lib.ConfigError, match=r"has no trace of steps 3 \(the run's steps "
                                                   r"1-4; traced: 1-2, 4\)$"):
    train.check_config(config, str(tmp_path / "run"))
  config.train.num_steps = 2
  train.check_config(config, str(tmp_path / "run"))
  for change, message in [(dict(microbatches=2), "step 1 was traced with train.microbatches=1, "
                                                 "this run has 2$"),
                          (dict(batch_size=64), r"step 1's block_1/moe choices are \[G,S,K\] = "
                                                r"\[32, 200, 2\] in \[0, 0\]; this run routes "
                                                r"\[16, 200, 2\] over 8 experts$")]:
    with pytest.raises(config_lib.ConfigError, match=message):
      train.check_config(vit(replay_from=str(tmp_path), num_steps=2, **change),
                         str(tmp_path / "run"))
