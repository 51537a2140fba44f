"""Sparse upcycling: experts copy the dense MLP, outputs follow from the gates, clear errors."""
import json
import re
import shutil

import flax
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from moe_jax import config as config_lib
from moe_jax import train, upcycle
from moe_jax.layers import DenseFFN, MoeLayer
from tests.test_models import apply, example, init, make_config
from tests.test_train import tiny


def test_upcycled_switch_layer_outputs_its_gate_times_the_dense_mlp():
  x = jax.random.normal(jax.random.key(0), (12, 6))
  dense = DenseFFN(16)
  dense_params = nn.meta.unbox(dense.init(jax.random.key(1), x)["params"])
  layer = MoeLayer(num_experts=4, expert_hidden_dim=16, group_size=12, capacity_factor=4.0)
  fresh = nn.meta.unbox(layer.init(jax.random.key(2), x)["params"])
  params = upcycle.upcycle_params({"block_0": {"moe": fresh}},
                                  {"block_0": {"mlp": dense_params}})["block_0"]["moe"]
  y, _ = layer.apply({"params": params}, x, deterministic=True,
                     mutable=["losses", "routing_stats"])
  p = jax.nn.softmax(x @ fresh["router"]["logits"]["kernel"])
  np.testing.assert_allclose(y, p.max(axis=-1, keepdims=True) * dense.apply(
      {"params": dense_params}, x), atol=1e-6)
  np.testing.assert_array_equal(params["router"]["logits"]["kernel"],
                                fresh["router"]["logits"]["kernel"])  # fresh router
  np.testing.assert_array_equal(params["experts"]["wi"][3], dense_params["mlp"]["wi"])


def test_upcycled_topk_model_is_the_dense_model():
  # Renormalized top-2 gates sum to 1 and the experts are equal: MoE(x) = MLP(x) when no choice
  # drops (eval capacity 4 x k x S / E covers every token).
  x = example("vit")
  dense_model, dense_params = init(make_config("vit", {"router": "dense"}), x)
  config = make_config("vit", {"router": "topk", "k": 2, "expert_hidden_dim": 32,
                               "eval_capacity_factor": 4.0})
  model, fresh = init(config, x)
  params = upcycle.upcycle_params(fresh, dense_params)
  np.testing.assert_allclose(apply(model, params, x)[0], apply(dense_model, dense_params, x)[0],
                             atol=1e-5)
  flat, dense_flat = (flax.traverse_util.flatten_dict(p) for p in (params, dense_params))
  copied = [path for path in flat if "router" not in path and "moe" not in path]
  assert len(copied) == len(dense_flat) - 2 * 2  # all but the 2 kernels of 2 upcycled MLPs
  for path in copied:
    np.testing.assert_array_equal(flat[path], dense_flat[path])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_granular_upcycling_splits_the_dense_mlp_and_is_the_dense_model(activation):
  # 2 copies x granularity 4 = 8 experts of width 32 / 4, top-2 copies = 8 choices; the dropless
  # path drops nothing.
  x = example("vit")
  dense_config = make_config("vit", {"router": "dense"}, activation=activation)
  dense_model, dense_params = init(dense_config, x)
  config = make_config("vit", {"router": "topk", "num_experts": 2, "granularity": 4,
                               "expert_hidden_dim": 32, "dispatch_path": "dropless"},
                       activation=activation)
  model, fresh = init(config, x)
  params = upcycle.upcycle_params(fresh, dense_params, granularity=4)
  np.testing.assert_allclose(apply(model, params, x)[0], apply(dense_model, dense_params, x)[0],
                             atol=1e-5)
  experts, dense_mlp = params["block_1"]["moe"]["experts"], dense_params["block_1"]["mlp"]["mlp"]
  for name in dense_mlp:  # expert 4 i + j = slice j of copy i; output kernels times 4
    for expert in (1, 6):
      hidden = slice(8 * (expert % 4), 8 * (expert % 4 + 1))
      expected = (4 * dense_mlp[name][hidden] if name == "wo"
                  else dense_mlp[name][:, hidden])
      np.testing.assert_allclose(experts[name][expert], expected, rtol=1e-6)
  router = params["block_1"]["moe"]["router"]["logits"]["kernel"]
  np.testing.assert_array_equal(router[:, 5], fresh["block_1"]["moe"]["router"]["logits"][
      "kernel"][:, 4])  # the slices of copy 1 share its column


def vit_run(router, **moe):
  config = tiny(common.vit(router), steps=2)
  config.model.mlp_dim = 64
  config.train.batch_size = 32
  config.train.warmup_steps = 1  # the first step's learning rate is 0: params stay as started
  config.train.checkpoint_every = 1
  config.model.moe.group_size = 100
  for key, value in moe.items():
    config.model.moe[key] = value
  return config


def test_upcycling_run_starts_from_the_dense_checkpoint_and_a_resumed_run_skips_it(tmp_path):
  dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
  train.train_and_evaluate(vit_run("dense"), str(dense_dir))
  config = vit_run("switch", expert_hidden_dim=64)
  config.train.upcycle_from = str(dense_dir)
  train.train_and_evaluate(config, str(moe_dir))
  dense_params = upcycle.load_dense_params(str(dense_dir))
  with ocp.CheckpointManager(str(moe_dir / "checkpoints")) as manager:
    params = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]
  for block in ("block_0", "block_1"):  # block_1 is the MoE layer: experts = the dense MLP
    np.testing.assert_array_equal(params[block]["attn"]["query"]["kernel"],
                                  dense_params[block]["attn"]["query"]["kernel"])
  for kernel in ("wi", "wo"):
    dense_kernel = dense_params["block_1"]["mlp"]["mlp"][kernel]
    np.testing.assert_array_equal(params["block_1"]["moe"]["experts"][kernel],
                                  np.broadcast_to(dense_kernel, (8,) + dense_kernel.shape))
  np.testing.assert_array_equal(params["head"]["kernel"], dense_params["head"]["kernel"])
  # A run with its own checkpoint resumes from it (train.py) and never reads the dense run.
  shutil.rmtree(dense_dir)
  upcycle.check_config(config, str(moe_dir))  # no error: the dense run is not looked at
  with pytest.raises(config_lib.ConfigError, match="holds no checkpointed run"):
    upcycle.check_config(config, str(tmp_path / "new_run"))


@pytest.mark.parametrize("router,moe,dense_changes,message", [
    ("dense", {}, {}, "config.train.upcycle_from='{dir}' needs MoE layers; "
                      "config.model.moe.router='dense'"),
    ("switch", {"expert_hidden_dim": 32}, {},
     "config.model.moe.expert_hidden_dim=32 must equal the dense run's "
     "config.model.mlp_dim=64: every expert starts as a copy of its MLP"),
    ("deepseek", {}, {}, "config.train.upcycle_from copies the dense MLP into routed experts; "
                         "config.model.moe.num_shared_experts=2, residual=False must be 0, "
                         "False"),
    ("switch", {"expert_hidden_dim": 64}, {"width": 32},
     "config.model.width=64 differs from the dense run's 32 ({dir}/config.json); upcycling "
     "copies its parameters"),
    ("switch", {"expert_hidden_dim": 64}, {"router": "topk"},
     "config.train.upcycle_from='{dir}' is a run with model.moe.router='topk'; upcycling "
     "starts from 'dense'"),
    ("switch", {"expert_hidden_dim": 64}, None,
     "config.train.upcycle_from='{dir}' holds no checkpointed run (config.json and "
     "checkpoints/)"),
])
def test_upcycling_config_errors_name_the_fields(tmp_path, router, moe, dense_changes,
                                                 message):
  source = tmp_path / "dense"
  if dense_changes is not None:  # a fake dense run: its config.json and one checkpoint step
    dense = vit_run("dense").to_dict()
    dense["model"]["moe"]["router"] = dense_changes.pop("router", "dense")
    dense["model"].update(dense_changes)
    (source / "checkpoints" / "1").mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(dense))
  config = vit_run(router, **moe)
  config.train.upcycle_from = str(source)
  with pytest.raises(config_lib.ConfigError,
                     match="^" + re.escape(message.format(dir=source)) + "$"):
    upcycle.check_config(config, str(tmp_path / "new_run"))
