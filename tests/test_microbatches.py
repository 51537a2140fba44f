"""Gradient accumulation (train.microbatches): the step of the whole batch, micro-batch by
micro-batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from moe_jax import models, train

LM_INFO = {"kind": "text", "vocab_size": 32, "seq_len": 8}


def tiny_lm(router, **train_fields):
  """A 1-layer LM of width 16 with 4 experts, every balancing loss weighted."""
  config = common.lm(router)
  config.model.update(num_layers=1, width=16, num_heads=2, mlp_dim=32)
  config.model.moe.update(num_experts=4, group_size=LM_INFO["seq_len"])  # a group: a sequence
  config.train.update(batch_size=8, aux_loss_weight=0.1, seq_aux_loss_weight=0.1,
                      global_aux_loss_weight=0.1, **train_fields)
  return config


def first_step(config, batch):
  """(state, metrics) after one train step from the seed's initial state."""
  model = models.get_model(config.model, LM_INFO)
  optimizer = optax.sgd(1.0)  # params - gradients: compiles faster than the AdamW of runs
  variables = nn.meta.unbox(train.initial_variables(model, batch["inputs"], jax.random.key(0)))
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           train.STATE: variables.get(train.STATE, {}),
           "opt_state": optimizer.init(variables["params"]),
           "rng": jax.random.key_data(jax.random.key(1))}
  train_step, _ = train.make_steps(model, optimizer, config.train, "text")
  return jax.device_get(jax.jit(train_step)(state, batch))


def lm_batch(padding=0):
  """8 sequences of LM_INFO's shape, the last `padding` of them padding."""
  tokens = np.random.default_rng(0).integers(0, LM_INFO["vocab_size"], (8, 9), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if padding:
    batch["mask"] = np.arange(8) < 8 - padding
  return batch


@pytest.mark.parametrize("router", ["topk", "loss_free", "remoe"])
def test_micro_batches_reach_the_parameters_and_metrics_of_the_whole_batch(router):
  batch = lm_batch(padding=2)  # micro-batches of 4 and 2 hold different numbers of padding rows
  (state, metrics), *accumulated = [first_step(tiny_lm(router, microbatches=n), batch)
                                    for n in ((1, 2, 4) if router == "topk" else (1, 2))]
  if router == "loss_free":  # the bias moved by the load of the whole batch
    assert np.abs(jax.tree.leaves(state[train.STATE])[0]).max() > 0
  if router == "remoe":  # denser than the target at init: lambda_0 x 1.2 in every case
    assert jax.tree.leaves(state[train.STATE])[0] == pytest.approx(1e-8 * 1.2)
  whole = without_micro_batch_max_violation(metrics)
  for other_state, other_metrics in accumulated:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 state, other_state)
    # Every loss and statistic; the per-group loss too, as no group spans two micro-batches.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                 whole, without_micro_batch_max_violation(other_metrics))


def without_micro_batch_max_violation(metrics):
  """The metrics less each layer's micro_batch_max_violation, each micro-batch's own."""
  routing = {layer: {k: v for k, v in stats.items() if k != "micro_batch_max_violation"}
             for layer, stats in metrics["routing"].items()}
  return {**metrics, "routing": routing}
