"""Dispatch: the dropless path against einsum, its layout, the gather-only backward, group sizes."""
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, experts, routers, routing, sharding
from moe_jax.layers import MoeLayer

MUTABLE = ["losses", "routing_stats"]


def output_and_grads(layer, x, token_mask):
  """(y, routing stats, grads wrt (params, x)) of sum(sin(y)), same init and routing rng."""
  init = jax.jit(lambda x: layer.init({"params": jax.random.key(0),
                                      "routing": jax.random.key(1)}, x, token_mask)["params"])
  params = nn.meta.unbox(init(x))
  apply = lambda p, x: layer.apply({"params": p}, x, token_mask, rngs={"routing": jax.random.key(2)},
                                   mutable=MUTABLE)

  def loss(p, x):
    y, state = apply(p, x)
    return jnp.sum(jnp.sin(y)), (y, state)

  (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, x)
  return y, state["routing_stats"]["stats"][0], grads


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol), a, b)


@pytest.mark.parametrize("router,activation", [("switch", "gelu"), ("gshard", "relu"),
                                               ("topk", "swiglu")])
def test_dropless_equals_einsum_without_drops_forward_and_gradient(router, activation):
  # 70 tokens in groups of 16 (the last padded) with padding; einsum gets capacity for all.
  x = jax.random.normal(jax.random.key(0), (2, 35, 8))
  token_mask = jnp.arange(35)[None, :] < jnp.array([[35], [30]])
  common = dict(num_experts=4, expert_hidden_dim=16, router=router, group_size=16,
                activation=activation)
  y_e, stats_e, grads_e = output_and_grads(
      MoeLayer(dispatch_path="einsum", capacity_factor=100.0, **common), x, token_mask)
  # tokamax runs XLA's ragged_dot on CPU, as the ragged_dot form does: gelu and swiglu suffice.
  for form in [f for f in dispatch.DROPLESS_FORMS if f != "tokamax" or activation != "relu"]:
    layer = MoeLayer(dispatch_path="dropless", dropless_form=form, capacity_factor=0.5, **common)
    y_d, stats_d, grads_d = output_and_grads(layer, x, token_mask)
    np.testing.assert_allclose(y_d, y_e, atol=1e-5)
    assert_trees_close(grads_d, grads_e, atol=1e-5)
    assert_trees_close(stats_d, stats_e, atol=1e-6)
    # GShard's random policy removes some 2nd choices (counted as dropped); capacity drops none.
    if router != "gshard":
      assert float(stats_d["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("router,extra", [("vmoe", {"noise_std": 0.25}), ("random", {}),
                                          ("base", {})])
def test_zoo_routers_on_the_dropless_path_equal_einsum(router, extra):
  x = jax.random.normal(jax.random.key(3), (2, 32, 8))
  common = dict(num_experts=4, expert_hidden_dim=16, router=router, group_size=16, **extra)
  y_e, stats_e, grads_e = output_and_grads(
      MoeLayer(dispatch_path="einsum", capacity_factor=100.0, **common), x, None)
  y_d, stats_d, grads_d = output_and_grads(MoeLayer(dispatch_path="dropless", **common), x, None)
  np.testing.assert_allclose(y_d, y_e, atol=1e-5)
  assert_trees_close(grads_d, grads_e, atol=1e-5)
  assert float(stats_d["dropped_fraction"]) == 0.0


def test_ragged_dot_form_equals_chunks_form():
  x = jax.random.normal(jax.random.key(1), (64, 8))
  outs = [output_and_grads(MoeLayer(num_experts=8, expert_hidden_dim=8, router="topk", k=3,
                                    dispatch_path="dropless", dropless_form=form), x, None)
          for form in ("ragged_dot", "chunks")]
  np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-6)
  assert_trees_close(outs[0][2], outs[1][2], atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_chunked_experts_equal_a_per_row_reference_forward_and_gradient(activation):
  # 1000 pairs: chunks of 512, 256, 128, 64, 32 and 512 spare rows. Runs of the 7 experts:
  # 560 rows (a 512 chunk, a 32 chunk, a last 32 chunk overlapping it), none, 256 (one chunk),
  # 100 (a last 128 chunk overhanging into the next experts), 7 (a last 32 overhanging), 43 (a 32
  # and a last 32 overlapping it), 20 (a last 32 overhanging into the 14 unprocessed pairs' rows).
  counts = [560, 0, 256, 100, 7, 43, 20]
  pair_expert = np.repeat(np.arange(8), counts + [14])  # 7 = E: not processed
  choice_expert = jnp.asarray(np.random.default_rng(0).permutation(pair_expert).reshape(500, 2))
  assert dispatch.chunk_sizes(1000) == (512, 256, 128, 64, 32)
  layout = dispatch.dropless_layout(choice_expert, 7, spare_rows=512)
  np.testing.assert_array_equal(layout.group_sizes, counts)
  processed = sum(counts)
  rows = jax.random.normal(jax.random.key(0), (1512, 8))
  n = dispatch.expert_matrices(activation)
  kernels = [jax.random.normal(jax.random.key(i), (7, 8, 16) if i < n else (7, 16, 8)) * 0.3
             for i in range(1, n + 1)]
  row_expert = jnp.asarray(np.repeat(np.arange(7), counts))
  cotangent = jax.random.normal(jax.random.key(9), (processed, 8))

  def chunked(rows, *kernels):
    y = experts.dropless_experts_mlp(rows, layout, *kernels, activation=activation,
                                     dtype=jnp.float32, form="chunks")
    return jnp.sum(y[:processed] * cotangent), y[:processed]

  def per_row(rows, *kernels):  # every row through its own expert's weights
    picked = [k[row_expert] for k in kernels]
    pre = [jnp.einsum("rm,rmh->rh", rows[:processed], k) for k in picked[:-1]]
    y = jnp.einsum("rh,rhm->rm", experts.activate(activation, *pre), picked[-1])
    return jnp.sum(y * cotangent), y

  argnums = tuple(range(n + 1))
  (_, y), grads = jax.value_and_grad(chunked, argnums, has_aux=True)(rows, *kernels)
  (_, y_ref), grads_ref = jax.value_and_grad(per_row, argnums, has_aux=True)(rows, *kernels)
  np.testing.assert_allclose(y, y_ref, atol=1e-4)
  assert_trees_close(grads, grads_ref, atol=1e-4)
  np.testing.assert_array_equal(grads[0][processed:], 0.0)  # rows past the pairs get nothing


def test_dropless_layout_by_hand():
  # Pairs (t K + k) -> expert: p0 e0, p1 e2, p2 e1, p3 e0, p4 e2, p5 not processed (E = 3).
  layout = dispatch.dropless_layout(jnp.array([[0, 2], [1, 0], [2, 3]]), 3)
  np.testing.assert_array_equal(layout.row_pair, [0, 3, 2, 1, 4, 6])
  np.testing.assert_array_equal(layout.row_token, [0, 1, 1, 0, 2, 3])
  np.testing.assert_array_equal(layout.pair_row, [[0, 3], [2, 1], [4, 6]])
  np.testing.assert_array_equal(layout.group_sizes, [2, 1, 2])
  # Two spare rows (R = 8): they read nothing, and the unprocessed pair points past them.
  spare = dispatch.dropless_layout(jnp.array([[0, 2], [1, 0], [2, 3]]), 3, spare_rows=2)
  np.testing.assert_array_equal(spare.row_pair, [0, 3, 2, 1, 4, 6, 6, 6])
  np.testing.assert_array_equal(spare.row_token, [0, 1, 1, 0, 2, 3, 3, 3])
  np.testing.assert_array_equal(spare.pair_row, [[0, 3], [2, 1], [4, 8]])
  # Blocks of B = 2: R = 2 (ceil(6/2) + 3) = 12; expert 0 in rows 0-1, expert 1 in row 2 (row 3
  # pads its block), expert 2 in rows 4-5; blocks 3-5 hold nothing and name expert 2.
  blocks = dispatch.dropless_layout(jnp.array([[0, 2], [1, 0], [2, 3]]), 3, block_size=2)
  np.testing.assert_array_equal(blocks.row_pair, [0, 3, 2, 6, 1, 4] + [6] * 6)
  np.testing.assert_array_equal(blocks.row_token, [0, 1, 1, 3, 0, 2] + [3] * 6)
  np.testing.assert_array_equal(blocks.pair_row, [[0, 4], [2, 1], [5, 12]])
  np.testing.assert_array_equal(blocks.block_expert, [0, 1, 2, 2, 2, 2])


def test_blocks_form_equals_a_per_row_reference_forward_and_gradient():
  # B = 4: runs of 9 (three blocks, the last padded), 0, 4 (one block), 1 rows, 2 pairs not
  # processed; R = 4 (ceil(16/4) + 4) = 32 rows, of which 20 lie in the experts' blocks.
  counts = [9, 0, 4, 1]
  pair_expert = np.repeat(np.arange(5), counts + [2])  # 4 = E: not processed
  choice_expert = jnp.asarray(np.random.default_rng(1).permutation(pair_expert).reshape(8, 2))
  layout = dispatch.dropless_layout(choice_expert, 4, block_size=4)
  np.testing.assert_array_equal(layout.block_expert, [0, 0, 0, 2, 3, 3, 3, 3])
  row_expert = np.array([0] * 9 + [-1] * 3 + [2] * 4 + [3] + [-1] * 15)  # -1: a padding row
  real = np.flatnonzero(row_expert >= 0)
  rows = jax.random.normal(jax.random.key(0), (32, 8)) * (row_expert >= 0)[:, None]
  kernels = [jax.random.normal(jax.random.key(1), (4, 8, 16)) * 0.3,
             jax.random.normal(jax.random.key(2), (4, 16, 8)) * 0.3]
  cotangent = jax.random.normal(jax.random.key(9), (real.size, 8))

  def in_blocks(rows, *kernels):
    y = experts.dropless_experts_mlp(rows, layout, *kernels, activation="gelu",
                                     dtype=jnp.float32, form="blocks")
    return jnp.sum(y[real] * cotangent), y

  def per_row(rows, *kernels):
    picked = [k[row_expert[real]] for k in kernels]
    hidden = jax.nn.gelu(jnp.einsum("rm,rmh->rh", rows[real], picked[0]))
    y = jnp.einsum("rh,rhm->rm", hidden, picked[1])
    return jnp.sum(y * cotangent), y

  (_, y), grads = jax.value_and_grad(in_blocks, (0, 1, 2), has_aux=True)(rows, *kernels)
  (_, y_ref), grads_ref = jax.value_and_grad(per_row, (0, 1, 2), has_aux=True)(rows, *kernels)
  np.testing.assert_allclose(y[real], y_ref, atol=1e-5)
  np.testing.assert_array_equal(y[row_expert < 0], 0.0)  # zero rows give zeros (gelu(0) = 0)
  assert_trees_close(grads, grads_ref, atol=1e-5)


def test_dropless_block_size_follows_the_cost_model():
  # sqrt(256 N / E): 724 at N = 16384, E = 8 -> 512; 256 at E = 64; clipped to [8, 1024].
  assert dispatch.dropless_block_size(16384, 8) == 512
  assert dispatch.dropless_block_size(16384, 64) == 256
  assert dispatch.dropless_block_size(1 << 20, 8) == 1024
  assert dispatch.dropless_block_size(10, 64) == 8


def test_take_rows_gradient_equals_autodiff_of_the_naive_gather():
  x = jax.random.normal(jax.random.key(2), (5, 3))
  index = jnp.array([4, 0, 5, 2, 0, 4, 7])  # 5 and 7: out of range, read zeros
  inverse = jnp.array([[1, 4], [7, 7], [3, 7], [7, 7], [0, 5]])  # rows reading x[a]; 7 = none
  out_grad = jax.random.normal(jax.random.key(3), (7, 3))
  naive = lambda x: x.at[index].get(mode="fill", fill_value=0)
  y, vjp = jax.vjp(lambda x: dispatch.take_rows(x, index, inverse), x)
  y_naive, vjp_naive = jax.vjp(naive, x)
  np.testing.assert_array_equal(y, y_naive)
  np.testing.assert_allclose(vjp(out_grad)[0], vjp_naive(out_grad)[0], atol=1e-6)
  # Forward mode too; reverse mode stays gather-only (no scatter-add).
  direction = jax.random.normal(jax.random.key(4), x.shape)
  tangent = jax.jvp(lambda x: dispatch.take_rows(x, index, inverse), (x,), (direction,))[1]
  np.testing.assert_allclose(tangent, naive(direction), atol=1e-6)
  assert "scatter" not in str(jax.make_jaxpr(vjp)(out_grad))


def forward_mode(layer, x):
  """(jvp, Hessian-vector product) of sum(sin(y)) in x along a fixed direction, the product
  forward over reverse (the layer's router must draw no routing rng)."""
  params = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, x)["params"])
  loss = lambda x: jnp.sum(jnp.sin(layer.apply({"params": params}, x)))
  v = jax.random.normal(jax.random.key(5), x.shape)
  return (jax.jit(lambda x: jax.jvp(loss, (x,), (v,))[1])(x),
          jax.jit(lambda x: jax.jvp(jax.grad(loss), (x,), (v,))[1])(x))


def forward_mode_layer(path, form=None):
  # groups of 12, room for every choice (cf 4), so every path computes the same.
  return MoeLayer(num_experts=4, expert_hidden_dim=8, router="topk", group_size=12,
                  capacity_factor=4.0, dispatch_path=path, dropless_form=form)


FORWARD_MODE_X = jax.random.normal(jax.random.key(4), (24, 6))


@functools.lru_cache(maxsize=1)
def forward_mode_of_einsum():
  """The einsum path's (jvp, HVP): the reference of every parametrization, computed once."""
  return forward_mode(forward_mode_layer("einsum"), FORWARD_MODE_X)


@pytest.mark.parametrize("path,form", [("index", None), ("dropless", "blocks"),
                                       ("dropless", "ragged_dot"), ("dropless", "chunks")])
def test_forward_mode_autodiff_of_the_gather_paths_equals_einsum(path, form):
  x, make = FORWARD_MODE_X, forward_mode_layer
  jvp, hvp = forward_mode(make(path, form), x)
  jvp_einsum, hvp_einsum = forward_mode_of_einsum()
  np.testing.assert_allclose(jvp, jvp_einsum, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hvp, hvp_einsum, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(hvp).max()) > 1e-3
  if form == "chunks":  # forward mode runs the experts as ragged_dot; reverse mode as chunks
    layer = make(path, form)
    params = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, x)["params"])
    loss = lambda x: jnp.sum(layer.apply({"params": params}, x))
    assert "ragged_dot" not in str(jax.make_jaxpr(jax.grad(loss))(x))
    assert "ragged_dot" in str(jax.make_jaxpr(lambda x: jax.jvp(loss, (x,), (x,)))(x))


def test_auto_group_size_follows_the_cost_model():
  # S <= 0.1 * n * H / 2: 204 for gelu at H = 2048; largest divisor of 8192 in [102, 204] is 128.
  assert dispatch.auto_group_size(8192, 2, 2048) == 128
  assert dispatch.auto_group_size(6400, 3, 512) == 64  # bound 76; 6400 = 64 * 100
  assert dispatch.auto_group_size(211, 2, 512) == 51  # prime: no divisor, last group padded
  assert dispatch.auto_group_size(40, 2, 2048) == 40  # fewer tokens than the bound: one group
  assert dispatch.auto_group_size(8192, 2, 2048, min_size=160) == 204  # no divisor in [160, 204]
  assert dispatch.auto_group_size(8192, 2, 64, min_size=25) == 25  # the floor over the bound 6
  layer = MoeLayer(num_experts=8, expert_hidden_dim=2048)
  assert layer.group_size is None and layer.resolved_group_size(8192) == 128
  assert layer.clone(group_size=256).resolved_group_size(8192) == 256
  # Toy sizes: the bound alone (6; S = 5, a divisor of 6400) would give C = min_capacity = 4
  # slots per expert for 5 tokens, 6.4 slots per token; the floor S = int(4 * 8 / 1.25) = 25
  # keeps it at 8 * 4 / 25 = 1.28.
  toy = MoeLayer(num_experts=8, expert_hidden_dim=64)
  assert toy.resolved_group_size(6400) == 25 and toy.capacity(25, deterministic=False) == 4
  assert toy.clone(router="topk").resolved_group_size(6400) == 12  # k = 2: int(32 / 2.5)
  assert toy.clone(dispatch_path="dropless").resolved_group_size(6400) == 5  # no capacity


def test_dropless_refuses_gspmd_expert_parallel_on_a_mesh_with_an_expert_axis():
  mesh = sharding.make_mesh({"data": -1, "expert": 2, "model": 1})
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, dispatch_path="dropless",
                   expert_parallel="gspmd")
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match=r"^dispatch_path='dropless' runs expert-parallel with "
                        r"expert_parallel='shard_map' only, not 'gspmd' \(on a mesh with expert "
                        r"axis 2\)"):
    jax.eval_shape(lambda x: layer.init({"params": jax.random.key(0)}, x), jnp.ones((8, 4)))


def test_each_path_refuses_the_routing_forms_it_cannot_run():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))  # [G,S,M]
  soft, _ = routers.SoftMoeRouter(num_experts=3).init_with_output(jax.random.key(1), x,
                                                                    capacity=2)
  assert isinstance(soft, routing.SoftSlots)
  assert dispatch.to_experts(x, soft, "einsum").shape == (2, 3, 2, 8)
  with pytest.raises(ValueError, match=r"^dispatch path 'index' takes the routing forms "
                     r"'choices', 'slots' with capacity, not SoftSlots \(form 'soft'\)$"):
    dispatch.to_experts(x, soft, "index")
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 6, 3)))
  choices = routing.tokens_choose(probs, k=2, capacity=None)
  with pytest.raises(ValueError, match=r"^dispatch path 'einsum' takes the routing forms "
                     r"'choices', 'slots', 'soft' with capacity, not TokenChoices \(form "
                     r"'choices', no capacity\)$"):
    dispatch.to_experts(x, choices, "einsum")
  slots = routing.experts_choose(probs, capacity=2)
  with pytest.raises(ValueError, match=r"^dispatch path 'dropless' takes the routing forms "
                     r"'choices', not ExpertSlots \(form 'slots'\)$"):
    dispatch.check_form("dropless", slots)
  merge = routing.experts_merge(probs)
  for path, forms in [("einsum", "'choices', 'slots', 'soft' with capacity"),
                      ("index", "'choices', 'slots' with capacity"), ("dropless", "'choices'")]:
    with pytest.raises(ValueError, match=rf"^dispatch path '{path}' takes the routing forms "
                       rf"{forms}, not MergeWeights \(form 'merge'\)$"):
      dispatch.check_form(path, merge)
  with pytest.raises(ValueError, match=r"^dispatch path 'merge' takes the routing forms "
                     r"'merge', not TokenChoices \(form 'choices'\)$"):
    dispatch.check_form("merge", choices)


def test_tokamax_is_the_default_on_the_gpus_it_supports_and_optional(monkeypatch):
  def on(platform, capability=None):
    device = type("Device", (), dict(platform=platform, compute_capability=capability))()
    monkeypatch.setattr(jax, "devices", lambda: [device])
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    return dispatch.default_dropless_form()

  assert [on("gpu", "9.0"), on("gpu", "8.0"), on("gpu", "7.5"), on("cpu")] == [
      "tokamax", "tokamax", "blocks", "chunks"]
  monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
  assert on("gpu", "9.0") == "blocks"
  monkeypatch.undo()
  # Forward mode runs the form's experts as ragged_dot (tokamax.ragged_dot is a custom_vjp).
  layout = dispatch.dropless_layout(jnp.array([[1], [0], [2], [1]]), 2)  # 2 = not processed
  rows, w_in, w_out = (jax.random.normal(jax.random.key(i), shape)
                       for i, shape in enumerate([(4, 2), (2, 2, 3), (2, 3, 2)]))
  run = lambda form: lambda *a: experts.dropless_experts_mlp(
      *a[:1], layout, *a[1:], activation="gelu", dtype=jnp.float32, form=form)
  jvps = [jax.jvp(run(form), (rows, w_in, w_out), (rows, w_in, w_out))
          for form in ("tokamax", "ragged_dot")]
  assert_trees_close(jvps[0], jvps[1], atol=1e-6)
  monkeypatch.setitem(sys.modules, "tokamax", None)  # what `import tokamax` finds uninstalled
  with pytest.raises(ImportError, match=r"^dropless_form='tokamax' needs the tokamax package "
                     r"\(pinned in requirements.txt\); allowed without it: 'ragged_dot', "
                     r"'chunks', 'blocks'$"):
    run("tokamax")(rows, w_in, w_out)
