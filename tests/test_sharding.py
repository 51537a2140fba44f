"""Expert parallelism on 8 CPU devices: sharded results equal the single-device ones."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from moe_jax import models, routers, sharding, train
from moe_jax.layers import MoeLayer

ROUTERS = ["switch", "gshard", "topk", "expert_choice"]
PATHS = ["einsum", "index"]
MESH = dict(data=2, expert=4, model=1)


def forward_and_grad(layer, params, x):
  def loss(params, x):
    y, sown = layer.apply({"params": params}, x, rngs={"routing": jax.random.key(5)},
                          mutable=["losses", "routing_stats"])
    return jnp.sum(jnp.sin(y)) + sown["losses"]["load_balance_loss"][0], y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


def assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol,
                                                       rtol=1e-5), a, b)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("path", PATHS)
def test_moe_layer_on_mesh_equals_single_device(router, path):
  # 16 sequences x 16 tokens in groups of 16: 16 groups, 2 per batch shard; cf 1.0 drops some.
  x = jax.random.normal(jax.random.key(0), (16, 16, 8))
  make = functools.partial(MoeLayer, num_experts=8, expert_hidden_dim=16, router=router,
                           group_size=16, capacity_factor=1.0, min_capacity=1,
                           dispatch_path=path)
  boxed = make().init({"params": jax.random.key(1), "routing": jax.random.key(2)}, x)["params"]
  params = nn.meta.unbox(boxed)
  expected = jax.jit(functools.partial(forward_and_grad, make()))(params, x)
  for mode in ("gspmd", "shard_map"):
    mesh = sharding.make_mesh(MESH)
    with jax.set_mesh(mesh):
      shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
      step = jax.jit(functools.partial(forward_and_grad, make(expert_parallel=mode)),
                     in_shardings=(shardings, sharding.batch_sharding(mesh)))
      sharded_params = jax.device_put(params, shardings)
      got = step(sharded_params, jax.device_put(x, sharding.batch_sharding(mesh)))
      hlo = step.lower(sharded_params, x).compile().as_text()
    assert_trees_close(got, expected)
    assert "all-to-all" in hlo, mode
    wi = sharded_params["experts"]["wi"]
    assert {shard.data.shape for shard in wi.addressable_shards} == {(2, 8, 16)}  # E/4 each


@pytest.mark.parametrize("form,mesh,mode", [
    ("chunks", dict(data=8, expert=1, model=1), "none"),
    ("blocks", dict(data=8, expert=1, model=1), "none"),
    ("chunks", MESH, "shard_map"), ("tokamax", dict(data=1, expert=4, model=2), "shard_map")])
def test_dropless_on_a_mesh_equals_single_device(form, mesh, mode):
  # Not expert-parallel: the pairs of all 8 batch shards are sorted together; GSPMD moves the
  # rows between devices. shard_map: each batch shard sorts its 2 (or 4) groups' pairs, sends each
  # of the 4 expert devices the rows of its 2 experts, and gets their outputs back (model=2 splits
  # H as well).
  x = jax.random.normal(jax.random.key(0), (16, 16, 8))
  make = functools.partial(MoeLayer, num_experts=8, expert_hidden_dim=16, router="topk",
                           group_size=16, dispatch_path="dropless", dropless_form=form)
  boxed = make().init({"params": jax.random.key(1), "routing": jax.random.key(2)}, x)["params"]
  params = nn.meta.unbox(boxed)
  expected = jax.jit(functools.partial(forward_and_grad, make()))(params, x)
  mesh = sharding.make_mesh(mesh)
  with jax.set_mesh(mesh):
    shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
    step = jax.jit(functools.partial(forward_and_grad, make(expert_parallel=mode)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)))
    sharded_params = jax.device_put(params, shardings)
    got = step(sharded_params, jax.device_put(x, sharding.batch_sharding(mesh)))
    lowered = step.lower(sharded_params, x).as_text()
  assert_trees_close(got, expected)
  shards = dict(mesh.shape)
  assert {shard.data.shape for shard in got[0].addressable_shards} == {
      (16 // (shards["data"] * shards["expert"]), 16, 8)}
  assert {shard.data.shape for shard in sharded_params["experts"]["wi"].addressable_shards} == {
      (8 // shards["expert"], 8, 16 // shards["model"])}
  assert ("all_to_all" in lowered) == (mode == "shard_map")


def tiny_vit(router, path, mode):
  config = common.vit(router)
  config.model.num_layers = 2
  config.model.width = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.moe.every = 1
  config.model.moe.dispatch_path = path
  config.model.moe.expert_parallel = mode
  config.model.moe.expert_hidden_dim = int(64 // (routers.get(router).default_k
                                                  or config.model.moe.capacity_factor))
  config.model.moe.group_size = 50  # one image per group
  config.model.moe.capacity_factor = 1.0
  return config


IMAGE_INFO = {"kind": "image", "image_shape": (28, 28, 1), "num_classes": 10}


@pytest.mark.parametrize("router,path,mode", [
    ("switch", "einsum", "gspmd"), ("switch", "index", "shard_map"),
    ("gshard", "index", "gspmd"),
    ("loss_free", "index", "shard_map"),  # loss_free: topk + a bias
    ("expert_choice", "einsum", "shard_map"), ("expert_choice", "index", "gspmd"),
    ("soft", "einsum", "shard_map")])
def test_train_step_on_mesh_equals_single_device(router, path, mode):
  config = tiny_vit(router, path, mode)
  model = models.get_model(config.model, IMAGE_INFO)
  optimizer = train.make_optimizer(config.train)
  train_step, _ = train.make_steps(model, optimizer, config.train, "image")
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((16, 28, 28, 1), np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  variables = model.init({"params": jax.random.key(0)}, batch["image"], deterministic=True)
  boxed, router_state = variables["params"], variables.get("router_state", {})
  params = nn.meta.unbox(boxed)
  state = {"step": jnp.array(3, jnp.int32), "params": params, "router_state": router_state,
           "opt_state": optimizer.init(params), "rng": jax.random.key_data(jax.random.key(1))}
  expected = jax.jit(train_step)(state, batch)

  mesh = sharding.make_mesh(MESH)
  with jax.set_mesh(mesh):
    param_shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = {"step": replicated, "params": param_shardings, "rng": replicated,
                       "router_state": jax.tree.map(lambda _: replicated, router_state),
                       "opt_state": sharding.like_params(state["opt_state"], param_shardings,
                                                         replicated)}
    step = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)))
    got = step(jax.device_put(state, state_shardings), batch)
  assert_trees_close(got, expected)
  if router == "loss_free":  # its bias, equal to the single-device one above, has moved
    bias = got[0]["router_state"]["block_1"]["moe"]["router"]["bias"]
    assert np.abs(np.asarray(bias)).max() == pytest.approx(1e-3)
  for name in ("wi", "wo"):
    for block in ("block_0", "block_1"):
      experts = got[0]["params"][block]["moe"]["experts"][name]
      assert {s.data.shape[0] for s in experts.addressable_shards} == {2}  # 8 experts / 4
      mu = got[0]["opt_state"][1].inner_states["experts"].inner_state[0].mu
      assert mu[block]["moe"]["experts"][name].sharding == experts.sharding


def test_tensor_parallel_model_axis_splits_the_hidden_dim():
  x = jax.random.normal(jax.random.key(0), (8, 16, 8))
  make = functools.partial(MoeLayer, num_experts=4, expert_hidden_dim=16, router="topk",
                           group_size=16, activation="swiglu")
  boxed = make().init({"params": jax.random.key(1)}, x)["params"]
  params = nn.meta.unbox(boxed)
  expected = jax.jit(functools.partial(forward_and_grad, make()))(params, x)
  for mode in ("gspmd", "shard_map"):
    mesh = sharding.make_mesh(dict(data=2, expert=2, model=2))
    with jax.set_mesh(mesh):
      shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
      step = jax.jit(functools.partial(forward_and_grad, make(expert_parallel=mode)),
                     in_shardings=(shardings, sharding.batch_sharding(mesh)))
      sharded_params = jax.device_put(params, shardings)
      got = step(sharded_params, x)
    assert_trees_close(got, expected)
    shapes = {s.data.shape for s in sharded_params["experts"]["wi_up"].addressable_shards}
    assert shapes == {(2, 8, 8)}  # E/2 experts, H/2 hidden units on each device


@pytest.mark.parametrize("sizes,message", [
    (dict(data=3, expert=1, model=1), r"^config.mesh sizes data=3, expert=1, model=1 do not "
                                      r"fit the 8 devices: their product must be 8, or divide it "
                                      r"with one size -1$"),
    (dict(data=-1, expert=-1, model=1), r"^config.mesh.data and config.mesh.expert are both -1 "
                                        r"\(the devices left over\): give one of them a size$"),
    (dict(data=-1, expert=1, model=0), r"^config.mesh.model=0 must be >= 1, or -1 \(the devices "
                                       r"left over\)$"),
])
def test_mesh_size_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(sizes)


@pytest.mark.parametrize("change,message", [
    (dict(expert=3, num_experts=8), "config.train.batch_size=128 must be divisible by the 6 "
                                    r"batch shards \(mesh data=2 x expert=3\)"),
    (dict(expert=8, num_experts=4), "config.model.moe.num_experts=4 is not divisible by "
                                    "config.mesh.expert=8"),
    (dict(expert=4, num_experts=8, group_size=3200), "config.model.moe.group_size=3200 gives 2 "
                                                     "groups per batch, not divisible by the 8 "
                                                     r"batch shards \(mesh data=2 x expert=4\)"),
    (dict(expert=1, num_experts=8, microbatches=32), r"config.train.batch_size=128 / "
     r"microbatches=32 must be divisible by the 8 batch shards \(mesh data=8 x expert=1\)"),
])
def test_divisibility_errors(change, message):
  config = common.vit("switch")
  config.mesh.expert = change["expert"]
  config.model.moe.num_experts = change["num_experts"]
  config.model.moe.group_size = change.get("group_size", 200)
  devices = 6 if change["expert"] == 3 else 8
  config.mesh.data = devices // change["expert"]
  config.train.microbatches = change.get("microbatches", 1)
  with pytest.raises(ValueError, match="^" + message + "$"):
    groups = [(layer.resolved_group_size(128 * 50), layer.num_experts)
              for layer in models.layer_plan(config.model, IMAGE_INFO).moe_layers().values()]
    sharding.check_divisibility(config, 50, devices, groups)
