"""Mixture-of-Depths (models/mod.py): which tokens a routed block processes and its output against
numpy, the predictor's loss, the LM's causal evaluation, FLOPs and parameters, config errors."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as config_lib
from moe_jax import train
from moe_jax.models import common, flop_counts, get_model, mod
from tests.test_models import INFO, LM_INFO, apply, example, init, make_config, num_params

WIDTH, LENGTH = 8, 6


def np_gelu(x):  # flax's nn.gelu: the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("deterministic", [False, True])
def test_routed_block_processes_the_top_k_tokens_times_their_weight_and_trains_the_predictor(
    deterministic):
  block = functools.partial(common.Block, 2, 16, "gelu", "layernorm", causal=True)
  layer = mod.RoutedBlock(block, capacity=0.5, predictor_dim=4)  # K = 3 of 6 tokens
  x = jax.random.normal(jax.random.key(0), (3, LENGTH, WIDTH))
  mask = jnp.array([[True] * LENGTH, [True] * LENGTH, [False] * LENGTH])  # a padding example
  params = layer.init(jax.random.key(1), x, deterministic=True)["params"]
  run = jax.jit(lambda q: layer.apply({"params": q}, x, deterministic=deterministic,
                                      token_mask=mask, mutable=["losses"]))
  (out, _), state = run(params)
  p = jax.tree.map(np.asarray, params)
  xs = np.asarray(x)
  weight = xs @ p["router"]["kernel"][:, 0] + p["router"]["bias"][0]  # [B,T]
  hidden = np_gelu(xs @ p["predictor_hidden"]["kernel"] + p["predictor_hidden"]["bias"])
  logit = hidden @ p["predictor_out"]["kernel"][:, 0] + p["predictor_out"]["bias"][0]
  top = np.zeros((2, LENGTH), bool)
  np.put_along_axis(top, np.argsort(-weight[:2], axis=1)[:, :3], True, axis=1)
  target = top.astype(np.float32)
  bce = np.maximum(logit[:2], 0) - logit[:2] * target + np.log1p(np.exp(-np.abs(logit[:2])))
  np.testing.assert_allclose(state["losses"]["mod_predictor_loss"][0], bce.mean(), rtol=1e-5)
  chosen = (logit[:2] > 0) if deterministic else top
  branch = np.zeros_like(xs)  # f(x) = block(x) - x of the processed tokens
  for b in range(2):
    tokens = np.flatnonzero(chosen[b])[:3]  # at most K, the first in token order
    picked = x[b:b + 1, tokens]
    branch[b, tokens] = jax.jit(block().apply, static_argnames="deterministic")(
        {"params": params["block"]}, picked, deterministic=True)[0][0] - picked[0]
  expected = xs + weight[..., None] * branch
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # padding: x unchanged
  if not deterministic:  # the router's bias gets the processed tokens' block outputs
    grad = jax.jit(jax.grad(lambda q: run(q)[0][0].sum()))(params)
    np.testing.assert_allclose(grad["router"]["bias"][0], branch.sum(), rtol=1e-4)


def lm_config(**mod_fields):
  return make_config("lm", {"router": "dense"}, num_layers=2, positions="learned",
                     mod={"every": 2, "capacity": 0.5, "predictor_dim": 8, **mod_fields})


def test_lm_evaluates_through_the_predictor_causally():
  inputs = example("lm", batch=2)
  model, params = init(lm_config(), inputs)
  run = jax.jit(lambda q, x: apply(model, q, x)[0])
  logits = run(params, inputs)
  # The block processes tokens at evaluation (else causality would hold trivially).
  skipped = {**params, "block_1": {**params["block_1"], "predictor_out": {
      "kernel": params["block_1"]["predictor_out"]["kernel"] * 0,
      "bias": params["block_1"]["predictor_out"]["bias"] * 0 - 1}}}
  assert not np.allclose(run(skipped, inputs), logits)
  for t in (1, 4, 7):
    changed = inputs.at[1, t].set((inputs[1, t] + 1) % LM_INFO["vocab_size"])
    new_logits = run(params, changed)
    np.testing.assert_array_equal(new_logits[0], logits[0])
    np.testing.assert_array_equal(new_logits[1, :t], logits[1, :t])
    assert not np.allclose(new_logits[1, t], logits[1, t])


@pytest.mark.parametrize("name", ["vit", "lm"])
def test_routed_blocks_cost_their_router_and_predictor_plus_k_of_t_tokens_by_hand(name):
  predictor = 8 if name == "lm" else 0
  config = make_config(name, {"router": "dense"}, positions="learned",
                       mod=dict(every=2, capacity=0.25, predictor_dim=predictor))
  dense = flop_counts(make_config(name, {"router": "dense"}, positions="learned"), INFO[name])
  counts = flop_counts(config, INFO[name])
  m, h, t = 16, 32, 5 if name == "vit" else 8  # ViT: 4 patches + class token
  k = 2  # ceil(0.25 t)
  block = lambda tokens: 2 * 4 * m * m + 4 * tokens * m + 2 * 2 * m * h
  routed = k / t * block(k) + 2 * m + 2 * (m + 1) * predictor
  assert counts["active_flops_per_token"] == pytest.approx(
      dense["active_flops_per_token"] + 2 * (routed - block(t)))  # blocks 1 and 3
  extra = 2 * (m + 1 + (m + 2) * predictor + (predictor > 0))
  assert counts["total_params"] == counts["active_params"] == dense["total_params"] + extra
  _, params = init(config, example(name), abstract=True)
  assert num_params(params) == counts["total_params"]


@pytest.mark.parametrize("name,mod_fields,fields,message", [
    ("lm", {"predictor_dim": 0}, {}, "model.mod.predictor_dim=0: the top-k over the sequence "
                                     "reads later tokens"),
    ("lm", {}, {"positions": "rope"}, "set model.positions='learned'"),
    ("vit", {}, {}, "model.mod.predictor_dim=8 is for the causal LM"),
    ("lm", {"capacity": 0.0}, {}, "model.mod.capacity=0.0 must be in (0, 1]"),
    ("lm", {"every": 5}, {}, "model.mod.every=5 places no routed block among "
                             "model.num_layers=2"),
])
def test_mod_config_errors_are_one_line_and_name_the_field(name, mod_fields, fields, message):
  config = lm_config(**mod_fields)
  config.name = name
  config.update(fields)
  for function in (get_model, flop_counts):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
      function(config, INFO[name])
    assert "\n" not in str(error.value)


def test_predictor_loss_is_summed_over_blocks_under_its_weight():
  sown = {"losses": {f"block_{i}": {"mod_predictor_loss": (0.5 + i,)} for i in (1, 3)}}
  assert float(train.moe_terms(sown)["mod_predictor_loss"]) == 5.0
  assert config_lib.default_config().train.mod_predictor_loss_weight == 1.0
