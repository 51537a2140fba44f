"""MoeLayer: dispatch paths agree, outputs match a token-by-token reference, errors are clear."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch
from moe_jax.layers import DenseFFN, MoeLayer
from tests import reference

ROUTERS = ["switch", "gshard", "topk", "expert_choice"]
MUTABLE = ["losses", "routing_stats"]


def init_apply(layer, x, token_mask=None, deterministic=False, seed=0):
  params = nn.meta.unbox(layer.init({"params": jax.random.key(seed),
                                     "routing": jax.random.key(1)}, x, token_mask)["params"])
  apply = lambda p, x: layer.apply({"params": p}, x, token_mask, deterministic=deterministic,
                                   rngs={"routing": jax.random.key(2)}, mutable=MUTABLE)
  return params, apply


@pytest.mark.parametrize("router", ROUTERS)
def test_einsum_and_index_paths_agree_forward_and_gradient(router):
  # 70 tokens in groups of 16 (the last padded), cf 1.0 so that some choices drop, and padding.
  x = jax.random.normal(jax.random.key(0), (2, 35, 8))
  token_mask = jnp.arange(35)[None, :] < jnp.array([[35], [30]])
  outputs = {}
  for path in ("einsum", "index"):
    layer = MoeLayer(num_experts=4, expert_hidden_dim=16, router=router, group_size=16,
                     capacity_factor=1.0, min_capacity=1, dispatch_path=path)
    params, apply = init_apply(layer, x, token_mask)
    loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x)[0]))
    outputs[path] = (apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x))
  (y_e, state_e), grads_e = outputs["einsum"]
  (y_i, state_i), grads_i = outputs["index"]
  assert state_e["routing_stats"]["stats"][0]["dropped_fraction"] > 0 or router == "expert_choice"
  np.testing.assert_allclose(y_e, y_i, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_e, grads_i)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_e, state_i)


@pytest.mark.parametrize("router,k", [("switch", 1), ("topk", 2), ("topk", 3)])
def test_layer_matches_token_by_token_reference(router, k):
  num_experts, model_dim, hidden = 4, 6, 10
  x = jax.random.normal(jax.random.key(3), (3, 12, model_dim))
  layer = MoeLayer(num_experts=num_experts, expert_hidden_dim=hidden, router=router,
                   k=None if router == "switch" else k, group_size=12, capacity_factor=1.0,
                   min_capacity=1, dispatch_path="index")
  params, apply = init_apply(layer, x)
  y, _ = apply(params, x)
  p = jax.tree.map(np.asarray, params)
  gelu = lambda h: np.asarray(jax.nn.gelu(h))
  experts = [lambda v, e=e: gelu(v @ p["experts"]["wi"][e]) @ p["experts"]["wo"][e]
             for e in range(num_experts)]

  def probs_fn(tokens):
    logits = tokens.astype(np.float64) @ p["router"]["logits"]["kernel"]
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

  capacity = layer.capacity(12, deterministic=False)
  expected = reference.moe_forward(np.asarray(x, np.float64), probs_fn, experts, k, capacity,
                                   renormalize=router == "topk")
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_single_expert_equals_dense_ffn():
  x = jax.random.normal(jax.random.key(4), (5, 8))
  moe = MoeLayer(num_experts=1, expert_hidden_dim=16, activation="swiglu", group_size=5,
                 capacity_factor=1.0)
  params, apply = init_apply(moe, x)
  dense_params = {"mlp": {name: w[0] for name, w in params["experts"].items()}}
  dense_y = DenseFFN(16, activation="swiglu").apply({"params": dense_params}, x)
  np.testing.assert_allclose(apply(params, x)[0], dense_y, atol=1e-6)  # p = 1 for one expert


@pytest.mark.parametrize("router,path", [("switch", "einsum"), ("gshard", "index"),
                                         ("topk", "einsum")])
def test_token_dropped_by_all_experts_outputs_exactly_zero(router, path):
  x = jnp.abs(jax.random.normal(jax.random.key(5), (16, 4))) + 0.1
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router=router, group_size=16,
                   capacity_factor=0.25, min_capacity=1, dispatch_path=path,
                   router_settings={"second_expert_policy": "all"} if router == "gshard" else {})
  params, apply = init_apply(layer, x)
  # Positive inputs and a router ranking experts 0 > 1 > rest for every token: the first C tokens
  # fill e0 (and e1 when k = 2) and the other tokens lose all their choices.
  params["router"]["logits"]["kernel"] = jnp.tile(jnp.array([[5., 4., 0., 0.]]), (4, 1))
  y, state = apply(params, x)
  y = np.asarray(y)
  capacity = layer.capacity(16, deterministic=False)
  assert capacity == layer.num_selected  # 1 for switch, 2 for top-2
  assert np.all(y[:capacity] != 0)
  assert np.all(y[capacity:] == 0.0)
  stats = state["routing_stats"]["stats"][0]
  np.testing.assert_allclose(stats["unrouted_fraction"], (16 - capacity) / 16)


def test_gradients_reach_router_through_combine_weights():
  x = jax.random.normal(jax.random.key(6), (32, 8))
  for router in ROUTERS:
    layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router=router, group_size=32)
    params, apply = init_apply(layer, x)
    grads = jax.grad(lambda p: jnp.sum(apply(p, x)[0] ** 2))(params)  # output only, no aux loss
    assert float(jnp.abs(grads["router"]["logits"]["kernel"]).min()) > 0, router


def test_sown_losses_match_the_functional_api():
  x = jax.random.normal(jax.random.key(7), (24, 8))
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="topk", group_size=24)
  params, apply = init_apply(layer, x)
  _, state = apply(params, x)
  logits = x @ params["router"]["logits"]["kernel"]
  probs = jax.nn.softmax(logits)
  top2 = jax.nn.one_hot(jax.lax.top_k(probs, 2)[1], 4).sum(1)
  from moe_jax import routing
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0],
                             routing.load_balancing_loss(probs, top2), rtol=1e-5)
  np.testing.assert_allclose(state["losses"]["z_loss"][0], routing.router_z_loss(logits),
                             rtol=1e-5)


def test_padding_tokens_are_not_routed():
  x = jax.random.normal(jax.random.key(8), (2, 10, 8))
  token_mask = jnp.array([[1] * 10, [1] * 4 + [0] * 6], bool)
  layer = MoeLayer(num_experts=2, expert_hidden_dim=8, router="switch", group_size=20,
                   capacity_factor=4.0)
  params, apply = init_apply(layer, x, token_mask)
  y, state = apply(params, x)
  assert np.all(np.asarray(y)[1, 4:] == 0.0)
  assert float(state["routing_stats"]["stats"][0]["expert_load"].sum()) == pytest.approx(1.0)
  # The same 14 real tokens with no padding: identical outputs and losses.
  real = jnp.concatenate([x[0], x[1, :4]])
  y_real, state_real = layer.apply({"params": params}, real, mutable=MUTABLE)
  np.testing.assert_allclose(jnp.concatenate([y[0], y[1, :4]]), y_real, atol=1e-6)
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0],
                             state_real["losses"]["load_balance_loss"][0], rtol=1e-6)


def _router_logits(layer, params, x, deterministic, seed):
  _, captured = layer.apply({"params": params}, x, deterministic=deterministic,
                            rngs={"routing": jax.random.key(seed)}, mutable=["intermediates"])
  logits = captured["intermediates"]["router"]["router_logits"][0]  # [G,S,E], after jitter and noise
  return np.asarray(logits).reshape(x.shape[0], -1)


def test_jitter_is_off_when_deterministic_and_bounded_when_on():
  x = jnp.abs(jax.random.normal(jax.random.key(9), (64, 4))) + 0.5
  eps = 0.1
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, group_size=64, jitter_eps=eps)
  params, _ = init_apply(layer, x)
  params["router"]["logits"]["kernel"] = jnp.eye(4)  # logits = jittered inputs
  clean = [_router_logits(layer, params, x, True, seed) for seed in (0, 1)]
  np.testing.assert_array_equal(clean[0], x)
  np.testing.assert_array_equal(clean[1], x)
  noisy = [_router_logits(layer, params, x, False, seed) for seed in (0, 1)]
  ratio = noisy[0] / np.asarray(x)
  assert ratio.min() >= 1 - eps and ratio.max() <= 1 + eps
  assert ratio.min() < 1 - eps / 2 and ratio.max() > 1 + eps / 2  # it does spread
  assert not np.array_equal(noisy[0], noisy[1])
  off = MoeLayer(num_experts=4, expert_hidden_dim=8, group_size=64)
  same = [_router_logits(off, params, x, False, seed) for seed in (0, 1)]
  np.testing.assert_array_equal(same[0], same[1])


def test_logit_noise_has_its_std_and_only_in_training():
  x = jax.random.normal(jax.random.key(10), (4096, 4))
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, group_size=256, noise_std=0.25)
  params, _ = init_apply(layer, x)
  clean = _router_logits(layer, params, x, True, 0)
  np.testing.assert_allclose(clean, x @ params["router"]["logits"]["kernel"], atol=1e-6)
  noise = _router_logits(layer, params, x, False, 0) - clean
  assert abs(noise.std() - 0.25) < 0.01 and abs(noise.mean()) < 0.01
  assert not np.array_equal(noise, _router_logits(layer, params, x, False, 1) - clean)


def test_bf16_compute_keeps_router_float32():
  x = jax.random.normal(jax.random.key(11), (64, 16))
  base = dict(num_experts=4, expert_hidden_dim=32, router="topk", group_size=64)
  params, apply32 = init_apply(MoeLayer(**base), x)
  _, apply16 = init_apply(MoeLayer(**base, dtype=jnp.bfloat16), x)
  (y32, s32), (y16, s16) = apply32(params, x), apply16(params, x)
  assert y16.dtype == jnp.float32 and s16["losses"]["z_loss"][0].dtype == jnp.float32
  np.testing.assert_array_equal(s16["losses"]["z_loss"][0], s32["losses"]["z_loss"][0])
  np.testing.assert_allclose(y16, y32, atol=0.05)


def test_eval_capacity_factor_applies_when_deterministic():
  layer = MoeLayer(num_experts=8, expert_hidden_dim=8, router="topk", capacity_factor=1.0,
                   eval_capacity_factor=2.0, min_capacity=1)
  assert layer.capacity(64, deterministic=False) == 16
  assert layer.capacity(64, deterministic=True) == 32
  assert layer.clone(min_capacity=8).capacity(4, deterministic=True) == 4  # at most S


@pytest.mark.parametrize("kwargs,message", [
    (dict(router="top3"), "MoeLayer.router='top3' is unknown; allowed: 'switch', 'gshard', "
                          "'topk', 'expert_choice', 'vmoe', 'soft', 'hash', 'random', 'base', "
                          "'loss_free', 'cosine', 'sbase', 'top_p', 'forced', 'remoe', "
                          "'dselect_k', 'moepp', 'stablemoe', 'smear', 'domain'"),
    (dict(router="topk", k=5), r"MoeLayer.k=5 must be in \[1, num_experts=4\]"),
    (dict(router="switch", k=2), "MoeLayer.k=2: router='switch' always chooses 1 expert; use "
                                 "router='topk' for k=2"),
    (dict(router="gshard", k=3), "MoeLayer.k=3: router='gshard' always chooses 2 experts; use "
                                 "router='topk' for k=3"),
    (dict(capacity_factor=0.0), "MoeLayer.capacity_factor=0.0 must be > 0"),
    (dict(eval_capacity_factor=-1), "MoeLayer.eval_capacity_factor=-1 must be > 0"),
    (dict(group_size=0), "MoeLayer.group_size=0 must be a positive integer"),
    (dict(dispatch_path="sparse"), "MoeLayer.dispatch_path='sparse' is unknown; allowed: "
                                   "'einsum', 'index', 'dropless', 'merge'"),
    (dict(router="expert_choice", dispatch_path="dropless"),
     "MoeLayer.dispatch_path='dropless' takes the routing forms 'choices', not the 'slots' "
     "form of router='expert_choice'; allowed paths for it: 'einsum', 'index'"),
    (dict(router="soft", group_size=8),
     "MoeLayer.dispatch_path='index' takes the routing forms 'choices', 'slots', not the "
     "'soft' form of router='soft'; allowed paths for it: 'einsum'"),
    (dict(router="soft", group_size=None, dispatch_path="einsum"),
     "MoeLayer.group_size=None \\(automatic\\) does not suit router='soft'; set it"),
    (dict(dispatch_path="dropless", dropless_form="dense"),
     "MoeLayer.dropless_form='dense' is unknown; allowed: 'ragged_dot', 'chunks', 'blocks', "
     "'tokamax'"),
    (dict(activation="tanh"), "MoeLayer.activation='tanh' is unknown; allowed: 'gelu', "
                              "'relu', 'swiglu'"),
    (dict(router="expert_choice", causal=True),
     "MoeLayer.router='expert_choice' reads future tokens and is invalid in a causal decoder; "
     "allowed there: 'switch', 'gshard', 'topk', 'vmoe', 'hash', 'random', 'loss_free', "
     "'cosine', 'top_p', 'forced', 'remoe', 'dselect_k', 'moepp', 'stablemoe', 'domain'"),
    (dict(router="expert_choice", k=2), "MoeLayer.k=2 is not used by router='expert_choice'; "
                                        "set capacity_factor \\(mean experts per token\\) "
                                        "instead"),
    (dict(batch_prioritized=True, causal=True),
     "MoeLayer.batch_prioritized orders tokens by probability across the group and reads "
     "future tokens; not allowed with causal=True"),
    (dict(router="soft", causal=True),
     "MoeLayer.router='soft' reads future tokens and is invalid in a causal decoder; allowed "
     "there: 'switch', 'gshard', 'topk', 'vmoe', 'hash', 'random', 'loss_free', 'cosine', "
     "'top_p', 'forced', 'remoe', 'dselect_k', 'moepp', 'stablemoe', 'domain'"),
    (dict(router="base", causal=True),
     "MoeLayer.router='base' reads future tokens and is invalid in a causal decoder; allowed "
     "there: 'switch', 'gshard', 'topk', 'vmoe', 'hash', 'random', 'loss_free', 'cosine', "
     "'top_p', 'forced', 'remoe', 'dselect_k', 'moepp', 'stablemoe', 'domain'"),
    (dict(router="soft", k=1, group_size=8, dispatch_path="einsum"),
     "MoeLayer.k=1 is not used by router='soft'; set capacity_factor \\(mean experts per "
     "token\\) instead"),
    (dict(router="hash", k=2), "MoeLayer.k=2: router='hash' always chooses 1 expert; use "
                               "router='topk' for k=2"),
    (dict(router="soft", batch_prioritized=True, group_size=8, dispatch_path="einsum"),
     "MoeLayer.batch_prioritized applies to the routers 'switch', 'gshard', 'topk', 'vmoe', "
     "'loss_free', 'cosine', 'top_p', not router='soft'"),
    (dict(router="random", noise_std=0.1),
     "MoeLayer.jitter_eps=0.0 and noise_std=0.1 must be 0 for router='random' \\(no learned "
     "softmax over experts\\)"),
    (dict(router="vmoe"), "MoeLayer.noise_std=0.0 must be > 0 for router='vmoe' \\(its load loss "
                          "is a probability under that noise; the paper: 1 / num_experts = "
                          "0.25\\)"),
    (dict(router="base", group_size=18),
     "MoeLayer.group_size=18 must be a multiple of num_experts=4 for router='base' \\(balanced "
     "assignment\\)"),
    (dict(router="loss_free", router_settings={"score_function": "tanh"}),
     "MoeLayer.loss_free.score_function='tanh' is unknown; allowed: 'softmax', 'sigmoid', "
     "'sqrtsoftplus'"),
    (dict(router_settings={"scores": "sigmoid"}),
     "MoeLayer.switch.scores is not a setting of router='switch'; its settings: "
     "'score_function', 'renormalize', 'scaling_factor', 'num_expert_groups', "
     "'top_expert_groups', 'group_score_experts', 'group_score_input', 'balance_per_k', "
     "'drop_policy', 'drop_rank', 'priority'"),
    (dict(router="vmoe", noise_std=0.25, router_settings={"score_function": "sigmoid"}),
     "MoeLayer.vmoe.score_function='sigmoid' must be 'softmax' for router='vmoe' \\(its "
     "importance loss is of the softmax\\)"),
    (dict(router="topk", router_settings={"scaling_factor": 0.0}),
     "MoeLayer.topk.scaling_factor=0.0 must be > 0"),
    (dict(router="topk", router_settings={"num_expert_groups": 3}),
     "MoeLayer.topk.num_expert_groups=3 must divide num_experts=4"),
    (dict(router="topk", router_settings={"num_expert_groups": 2, "top_expert_groups": 3}),
     "MoeLayer.topk.top_expert_groups=3 must be in \\[1, min\\(num_expert_groups=2, k=2\\)\\] "
     "\\(each chosen group is scored by its top k / top_expert_groups scores\\)"),
    (dict(router="topk", k=3, router_settings={"num_expert_groups": 2}),
     "MoeLayer.k=3 exceeds the 2 experts of the topk.top_expert_groups=1 groups"),
    (dict(router="expert_choice", router_settings={"score_function": "sigmoid"}),
     "MoeLayer.expert_choice.score_function is not a setting of router='expert_choice'; its "
     "settings: none"),
    (dict(router="loss_free", router_settings={"bias_update_rate": -1.0}),
     "MoeLayer.loss_free.bias_update_rate=-1.0 must be >= 0"),
    (dict(router="gshard", router_settings={"second_expert_policy": "sometimes"}),
     "MoeLayer.gshard.second_expert_policy='sometimes' is unknown; allowed: 'all', 'random'"),
])
def test_config_errors_are_one_line_and_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    MoeLayer(num_experts=4, expert_hidden_dim=8, **kwargs)


def test_group_tokens_pads_and_ungroup_restores():
  x = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
  groups, mask = dispatch.group_tokens(x, None, group_size=4)
  assert groups.shape == (4, 4, 3) and mask.sum() == 14 and not mask[3, 2:].any()
  np.testing.assert_array_equal(dispatch.ungroup_tokens(groups, x.shape), x)


def loss_free_layer(x, **kwargs):
  """A loss_free MoeLayer (room for every choice) and its {'params', 'router_state'}."""
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="loss_free", group_size=12,
                   capacity_factor=4.0, **kwargs)
  variables = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, x, deterministic=True))
  return layer, {"params": variables["params"], "router_state": variables["router_state"]}


def test_loss_free_bias_is_float32_state_updated_only_by_training_calls():
  x = jax.random.normal(jax.random.key(9), (12, 6))
  layer, variables = loss_free_layer(x, router_settings={"bias_update_rate": 0.1})
  assert "bias" not in str(jax.tree_util.tree_structure(variables["params"]))
  bias = variables["router_state"]["router"]["bias"]
  assert bias.dtype == jnp.float32 and np.all(bias == 0) and bias.shape == (4,)
  _, state = layer.apply(variables, x, deterministic=False, mutable=MUTABLE + ["router_state"])
  probs = np.asarray(jax.nn.softmax(x @ variables["params"]["router"]["logits"]["kernel"]))
  load = np.bincount(np.argsort(-probs, axis=-1)[:, :2].ravel(), minlength=4)  # top-2 counts
  assert load.sum() == 24 and load.max() > 6  # unbalanced at init
  np.testing.assert_allclose(state["router_state"]["router"]["bias"], 0.1 * np.sign(6 - load))
  np.testing.assert_array_equal(state["losses"]["load_balance_loss"][0], 0.0)
  for deterministic, mutable in [(True, MUTABLE + ["router_state"]), (False, MUTABLE)]:
    _, state = layer.apply(variables, x, deterministic=deterministic, mutable=mutable)
    assert "router_state" not in state or np.all(state["router_state"]["router"]["bias"] == 0)


def test_loss_free_init_leaves_the_bias_at_zero():
  x = jax.random.normal(jax.random.key(9), (12, 6))  # unbalanced at init (see above)
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="loss_free", group_size=12,
                   router_settings={"bias_update_rate": 0.1})
  variables = layer.init({"params": jax.random.key(0), "routing": jax.random.key(1)}, x)
  np.testing.assert_array_equal(variables["router_state"]["router"]["bias"], np.zeros(4))


def test_loss_free_bias_steers_choices_and_sigmoid_gates_ignore_it():
  x = jax.random.normal(jax.random.key(10), (12, 6))
  layer, variables = loss_free_layer(x, router_settings={"score_function": "sigmoid"})
  variables["router_state"]["router"]["bias"] = jnp.array([0., 0., 0., 10.])
  y, state = layer.apply(variables, x, deterministic=True, mutable=MUTABLE)
  p = jax.tree.map(np.asarray, variables["params"])
  scores = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ p["router"]["logits"]["kernel"])))
  expected = np.zeros(x.shape)
  for t in range(12):
    chosen = [3, int(np.argmax(scores[t, :3]))]  # the bias puts e3 in every top-2
    for e in chosen:
      hidden = np.asarray(jax.nn.gelu(np.asarray(x[t]) @ p["experts"]["wi"][e]))
      expected[t] += scores[t, e] / scores[t, chosen].sum() * (hidden @ p["experts"]["wo"][e])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(state["routing_stats"]["stats"][0]["expert_load"][3], 0.5)


def test_loss_free_sigmoid_entropy_and_confidence_are_of_the_normalized_scores():
  x = jax.random.normal(jax.random.key(13), (12, 6))
  layer, variables = loss_free_layer(x, router_settings={"score_function": "sigmoid"})
  _, state = layer.apply(variables, x, deterministic=True, mutable=MUTABLE)
  stats = state["routing_stats"]["stats"][0]
  kernel = np.asarray(variables["params"]["router"]["logits"]["kernel"], np.float64)
  scores = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ kernel)))  # [S,E], rows sum to about 2
  p = scores / scores.sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(stats["router_entropy"], -(p * np.log(p)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(stats["top1_confidence"], p.max(-1).mean(), rtol=1e-5)
  assert float(stats["router_entropy"]) <= np.log(4) and float(stats["top1_confidence"]) < 0.5


def test_loss_free_bias_gets_no_gradient():
  x = jax.random.normal(jax.random.key(11), (12, 6))
  layer, variables = loss_free_layer(x)
  variables["router_state"]["router"]["bias"] = jnp.array([.3, -.2, .1, 0.])
  loss = lambda variables: jnp.sum(layer.apply(variables, x, deterministic=True) ** 2)
  grads = jax.grad(loss)(variables)
  np.testing.assert_array_equal(grads["router_state"]["router"]["bias"], np.zeros(4))
  assert float(jnp.abs(grads["params"]["router"]["logits"]["kernel"]).min()) > 0


def test_residual_moe_mixes_mlp_and_experts_by_a_learned_coefficient():
  x = jax.random.normal(jax.random.key(12), (12, 6))
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, group_size=12, capacity_factor=4.0,
                   residual=True)
  params, apply = init_apply(layer, x)
  y, _ = apply(params, x)
  moe_y, _ = MoeLayer(num_experts=4, expert_hidden_dim=8, group_size=12,
                      capacity_factor=4.0).apply(
      {"params": {"router": params["router"], "experts": params["experts"]}}, x,
      rngs={"routing": jax.random.key(2)}, mutable=MUTABLE)
  mlp_y = DenseFFN(8).apply({"params": {"mlp": params["residual_mlp"]}}, x)
  coef = jax.nn.softmax(x @ params["residual_coef"]["kernel"] + params["residual_coef"]["bias"])
  np.testing.assert_allclose(y, coef[:, :1] * moe_y + coef[:, 1:] * mlp_y, atol=1e-6)
