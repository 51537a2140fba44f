"""The router zoo (V-MoE noisy top-k, Soft MoE, hash, random, BASE) against hand-computed cases,
brute force and naive numpy implementations written from docs/ROUTING.md."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.optimize import linear_sum_assignment

from configs import common
from moe_jax import experts as experts_lib
from moe_jax import models, routing, sharding
from moe_jax.routers import sparse_gates
from moe_jax.layers import MoeLayer

MUTABLE = ["losses", "routing_stats"]
NUM_EXPERTS, MODEL_DIM, HIDDEN = 4, 6, 8


def make(router, **kwargs):
  return MoeLayer(num_experts=NUM_EXPERTS, expert_hidden_dim=HIDDEN, router=router,
                  **{"group_size": 16, **kwargs})


def run(layer, x, params=None, token_ids=None, token_mask=None, deterministic=False, seed=2):
  """(params, y, state) of one apply; params initialized when None. Jitted: one compilation
  each is faster than the many small ones of op-by-op execution."""
  if params is None:
    init = jax.jit(lambda x, mask, ids: layer.init(
        {"params": jax.random.key(0), "routing": jax.random.key(1)}, x, mask,
        token_ids=ids)["params"])
    params = nn.meta.unbox(init(x, token_mask, token_ids))
  apply = jax.jit(lambda p, x, mask, ids: layer.apply(
      {"params": p}, x, mask, token_ids=ids, deterministic=deterministic,
      rngs={"routing": jax.random.key(seed)}, mutable=MUTABLE))
  y, state = apply(params, x, token_mask, token_ids)
  return params, np.asarray(y), state


def stats_of(state):
  return {k: np.asarray(v) for k, v in state["routing_stats"]["stats"][0].items()}


def numpy_experts(params):
  """[callable x [M] -> [M]] per expert, gelu MLPs in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["experts"])
  gelu = lambda h: np.asarray(jax.nn.gelu(h))
  return [lambda v, e=e: gelu(v @ p["wi"][e]) @ p["wo"][e] for e in range(NUM_EXPERTS)]


# ---------------------------------------------------------------------------------------------
# V-MoE noisy top-k


def test_load_loss_matches_the_papers_formula_by_hand():
  clean = np.array([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
  noisy = np.array([[[1.2, -0.1, -0.8], [0.3, 0.6, 0.1]]])
  sigma = 0.5
  # k = 1: thresholds are the top noisy logits, 1.2 and 0.6.
  p = np.stack([1 - stats.norm.cdf((1.2 - clean[0, 0]) / sigma),
                1 - stats.norm.cdf((0.6 - clean[0, 1]) / sigma)])
  load = p.sum(0)
  expected = load.var() / load.mean() ** 2
  got = routing.load_loss(jnp.array(clean), jnp.array(noisy), k=1, noise_std=sigma)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # k = 2: the thresholds are the second largest noisy logits, -0.1 and 0.3; a padded token
  # counts for nothing.
  p2 = 1 - stats.norm.cdf((-0.1 - clean[0, 0]) / sigma)
  got = routing.load_loss(jnp.array(clean), jnp.array(noisy), k=2, noise_std=sigma,
                          token_mask=jnp.array([[1, 0]]))
  np.testing.assert_allclose(got, p2.var() / p2.mean() ** 2, rtol=1e-5)


def test_vmoe_layer_aux_loss_is_importance_plus_load():
  x = jax.random.normal(jax.random.key(3), (32, MODEL_DIM))
  layer = make("vmoe", group_size=32, noise_std=0.25, batch_prioritized=True)
  params, _, state = run(layer, x, deterministic=True)  # no noise: clean = noisy logits
  logits = x @ params["router"]["logits"]["kernel"]
  probs = jax.nn.softmax(logits)
  expected = (routing.importance_loss(probs)
              + routing.load_loss(logits, logits, k=2, noise_std=0.25))
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], expected, rtol=1e-5)
  assert layer.num_selected == 2


def numpy_importance_loss(probs, valid):
  """V-MoE (vmoe's _importance_auxiliary_loss, vmapped over groups): per group the CV^2 of each
  expert's summed probability over the real tokens, then the mean over groups with one."""
  losses = [np.var(p[v].sum(0)) / np.mean(p[v].sum(0)) ** 2 for p, v in zip(probs, valid)
            if v.any()]
  return np.mean(losses)


def test_importance_loss_is_per_group_over_real_tokens():
  probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5))  # [G,S,E]
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  got = routing.importance_loss(jnp.array(probs, jnp.float32), jnp.array(valid))
  np.testing.assert_allclose(got, numpy_importance_loss(probs, valid), rtol=1e-5)


def test_vmoe_importance_loss_is_of_the_clean_softmax_per_group():
  # Two groups of 16 in training, so the logits carry noise (std 0.25).
  x = jax.random.normal(jax.random.key(3), (32, MODEL_DIM))
  layer = make("vmoe", noise_std=0.25)
  params, _, _ = run(layer, x)
  _, state = layer.apply({"params": params}, x, rngs={"routing": jax.random.key(2)},
                         mutable=MUTABLE + ["intermediates"])
  noisy = state["intermediates"]["router"]["router_logits"][0]  # [G,S,E]
  clean = (x @ params["router"]["logits"]["kernel"]).reshape(noisy.shape)
  assert float(jnp.abs(noisy - clean).max()) > 0.1
  probs = np.asarray(jax.nn.softmax(np.asarray(clean, np.float64)))
  importance = numpy_importance_loss(probs, np.ones(probs.shape[:2], bool))
  load = routing.load_loss(clean, noisy, k=2, noise_std=0.25)
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], importance + load,
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Soft MoE


def numpy_soft_moe(x, phi, scale, experts, valid):
  """x [G,S,M], phi [M,E,C] -> y [G,S,M], written from the paper's equations."""
  l2 = lambda v, axis: v / np.sqrt((v * v).sum(axis, keepdims=True) + 1e-6)
  num_groups, group_size, _ = x.shape
  _, num_experts, capacity = phi.shape
  y = np.zeros_like(x)
  for g in range(num_groups):
    real = np.flatnonzero(valid[g])
    logits = scale * l2(x[g, real], -1) @ l2(phi, 0).reshape(x.shape[-1], -1)  # [T, E*C]
    dispatch_w = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)  # over tokens
    combine_w = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # over slots
    slot_in = dispatch_w.T @ x[g, real]  # [E*C, M]
    slot_out = np.stack([experts[slot // capacity](slot_in[slot])
                         for slot in range(num_experts * capacity)])
    y[g, real] = combine_w @ slot_out
  return y


def test_soft_moe_matches_numpy_and_ignores_padding():
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 12, MODEL_DIM)), np.float64)
  mask = np.ones((2, 12), bool)
  mask[1, 9:] = False
  layer = make("soft", group_size=12, capacity_factor=1.0, min_capacity=1,
               dispatch_path="einsum")
  assert layer.capacity(12, deterministic=True) == 3  # slots per expert: S cf / E
  params, y, state = run(layer, jnp.array(x, jnp.float32), token_mask=jnp.array(mask))
  assert set(params["router"]) == {"slots", "scale"}
  assert params["router"]["slots"].shape == (MODEL_DIM, NUM_EXPERTS, 3)
  params["router"]["scale"] = jnp.array(2.5)  # the scale is used, not just initialized
  _, y, state = run(layer, jnp.array(x, jnp.float32), params, token_mask=jnp.array(mask))
  expected = numpy_soft_moe(x.reshape(2, 12, -1), np.asarray(params["router"]["slots"],
                                                             np.float64),
                            2.5, numpy_experts(params), mask)
  np.testing.assert_allclose(y, expected, atol=2e-5)
  assert np.all(y[1, 9:] == 0)
  stats = stats_of(state)
  assert stats["dropped_fraction"] == 0 and stats["unrouted_fraction"] == 0
  np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, rtol=1e-6)
  assert 0 < stats["router_entropy"] <= np.log(NUM_EXPERTS) + 1e-6
  assert float(state["losses"]["load_balance_loss"][0]) == 0.0
  assert float(state["losses"]["z_loss"][0]) == 0.0


def test_soft_moe_slot_count_is_fixed_and_its_parameters_learn():
  x = jax.random.normal(jax.random.key(5), (40, MODEL_DIM))
  layer = make("soft", capacity_factor=1.25, eval_capacity_factor=2.0, dispatch_path="einsum")
  # ceil(1.25 * 16 / 4) = 5 slots per expert, training and evaluation, whatever the group.
  assert {layer.capacity(s, d) for s in (8, 16) for d in (True, False)} == {5}
  params = run(layer, x)[0]
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(layer.apply({"params": p}, x, mutable=MUTABLE)[0] ** 2)))(params)["router"]
  assert float(jnp.abs(grads["slots"]).min()) > 0 and float(jnp.abs(grads["scale"])) > 0


# ---------------------------------------------------------------------------------------------
# Hash and random routing


def test_hash_buckets_are_fixed_balanced_and_shuffled():
  buckets = routing.hash_buckets(256, 8)
  np.testing.assert_array_equal(np.bincount(buckets), [32] * 8)
  np.testing.assert_array_equal(buckets, routing.hash_buckets(256, 8))
  assert not np.array_equal(buckets, np.arange(256) * 8 // 256)  # not contiguous id ranges
  assert sorted(np.bincount(routing.hash_buckets(50, 8))) == [6] * 6 + [7] * 2


def test_hash_layer_sends_each_token_to_its_ids_bucket_with_gate_one():
  x = jax.random.normal(jax.random.key(6), (2, 8, MODEL_DIM))
  ids = jnp.array([[3, 7, 3, 0, 9, 9, 1, 5], [2, 2, 2, 2, 4, 6, 8, 10]])
  layer = make("hash", num_token_ids=12, capacity_factor=4.0)  # capacity S: nothing dropped
  params, y, state = run(layer, x, token_ids=ids)
  assert "router" not in params
  experts, buckets = numpy_experts(params), routing.hash_buckets(12, NUM_EXPERTS)
  expected = [[experts[buckets[i]](v) for v, i in zip(row, id_row)]
              for row, id_row in zip(np.asarray(x, np.float64), np.asarray(ids))]
  np.testing.assert_allclose(y, expected, atol=1e-5)
  stats = stats_of(state)
  np.testing.assert_allclose(stats["expert_load"],
                             np.bincount(buckets[np.asarray(ids).ravel()], minlength=4) / 16)
  assert stats["router_entropy"] == 0 and stats["top1_confidence"] == 1
  _, y_eval, _ = run(layer, x, params, token_ids=ids, deterministic=True)
  np.testing.assert_array_equal(y_eval, y)


def test_random_routing_is_uniform_in_training_and_fixed_in_evaluation():
  x = jnp.ones((1024, MODEL_DIM))
  layer = make("random", group_size=1024, capacity_factor=2.0)
  params, _, state = run(layer, x, seed=2)
  assert "router" not in params
  load = stats_of(state)["expert_load"]
  np.testing.assert_allclose(load, 0.25, atol=0.045)  # 3.3 std of a share of 1024 tokens
  assert stats_of(state)["dropped_fraction"] == 0
  _, _, other = run(layer, x, params, seed=3)
  assert not np.array_equal(stats_of(other)["expert_load"], load)
  evals = [stats_of(run(layer, x, params, deterministic=True, seed=s)[2])["expert_load"]
           for s in (2, 3)]
  np.testing.assert_array_equal(evals[0], evals[1])
  # Gate 1: equal tokens give the output of the expert they were sent to, unscaled.
  x = jax.random.normal(jax.random.key(7), (1, MODEL_DIM)) * jnp.ones((8, 1))
  params, y, _ = run(make("random", group_size=8, capacity_factor=4.0), x)
  outputs = [e(np.asarray(x[0], np.float64)) for e in numpy_experts(params)]
  assert all(min(np.abs(row - o).max() for o in outputs) < 1e-5 for row in y)


def test_random_layers_route_independently_in_evaluation_each_with_its_own_fixed_key():
  class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        make("random", group_size=256, capacity_factor=4.0, name=f"moe_{i}")(
            x, deterministic=True)

  x = jnp.ones((256, MODEL_DIM))
  params = nn.meta.unbox(TwoLayers().init(jax.random.key(0), x)["params"])

  def experts(seed):
    _, state = TwoLayers().apply({"params": params}, x, rngs={"routing": jax.random.key(seed)},
                                 mutable=["intermediates"])
    return [np.argmax(state["intermediates"][f"moe_{i}"]["decisions"][0]["selected"], -1)
            for i in range(2)]

  first, second = experts(2), experts(3)
  for i in range(2):  # fixed: the routing rng does not enter evaluation
    np.testing.assert_array_equal(first[i], second[i])
  # Independent layers agree on 1/E of the tokens (0.25, std 0.027 over 256 tokens), not all.
  assert (first[0] == first[1]).mean() < 0.4


# ---------------------------------------------------------------------------------------------
# BASE layers


def brute_force_assignment(scores):
  """[S,E] -> the total score of the optimal assignment with S/E tokens per expert."""
  num_tokens, num_experts = scores.shape
  slots = np.repeat(scores, num_tokens // num_experts, axis=1)  # [S, S] token x expert copy
  rows, cols = linear_sum_assignment(slots, maximize=True)
  return slots[rows, cols].sum()


def test_balanced_assignment_beats_greedy_on_a_hand_made_case():
  # Every token prefers e0; the best balanced assignment puts tokens 0 and 2 there (they lose the
  # most elsewhere) and tokens 1 and 3 on e1: 10 + 9 + 8 + 1 = 28.
  scores = np.array([[10., 0.], [9., 8.], [9.5, 1.], [5., 1.]])
  got = np.asarray(routing.balanced_assignment(jnp.array(scores[None])))[0]
  np.testing.assert_array_equal(got, [0, 1, 0, 1])
  all_balanced = [a for a in itertools.product(range(2), repeat=4) if sum(a) == 2]
  best = max(all_balanced, key=lambda a: sum(scores[s, e] for s, e in enumerate(a)))
  np.testing.assert_array_equal(got, best)
  assert brute_force_assignment(scores) == 10 + 8 + 9.5 + 1


def test_balanced_assignment_is_exactly_balanced_and_optimal_on_small_groups():
  scores = np.random.default_rng(0).normal(size=(10, 12, 3)).astype(np.float32)
  got = np.asarray(routing.balanced_assignment(jnp.array(scores)))
  for group, assignment in zip(scores, got):
    np.testing.assert_array_equal(np.bincount(assignment, minlength=3), [4, 4, 4])
    total = group[np.arange(12), assignment].sum()
    np.testing.assert_allclose(total, brute_force_assignment(group), rtol=1e-5)


def test_base_layer_balances_in_training_and_is_greedy_in_evaluation():
  x = jax.random.normal(jax.random.key(8), (32, MODEL_DIM))
  layer = make("base", group_size=16, capacity_factor=1.0, eval_capacity_factor=4.0)
  assert layer.capacity(16, deterministic=False) == 4  # S / E, nothing more
  params, y, state = run(layer, x)
  stats = stats_of(state)
  np.testing.assert_array_equal(stats["expert_load"], [0.25] * 4)
  assert stats["dropped_fraction"] == 0 and stats["unrouted_fraction"] == 0
  logits = np.asarray(x @ params["router"]["logits"]["kernel"], np.float64)
  experts = numpy_experts(params)
  x64 = np.asarray(x, np.float64)
  # Evaluation: y_s = sigmoid(logit of the argmax expert) * that expert's output.
  _, y_eval, _ = run(layer, x, params, deterministic=True)
  best = logits.argmax(-1)
  expected = [experts[e](v) / (1 + np.exp(-logits[s, e])) for s, (v, e) in
              enumerate(zip(x64, best))]
  np.testing.assert_allclose(y_eval, expected, atol=1e-5)
  # Training: the same gate on the balanced assignment of each group of 16.
  assigned = np.asarray(routing.balanced_assignment(jnp.array(logits.reshape(2, 16, 4)))).ravel()
  expected = [experts[e](v) / (1 + np.exp(-logits[s, e])) for s, (v, e) in
              enumerate(zip(x64, assigned))]
  np.testing.assert_allclose(y, expected, atol=1e-5)
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x, mutable=MUTABLE)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["router"]["logits"]["kernel"]).max()) > 0  # through the gate


# ---------------------------------------------------------------------------------------------
# Validation (MoeLayer's one-line messages for the zoo: tests/test_layers.py)


def test_hash_without_ids_is_refused_and_balanced_assignment_needs_divisible_groups():
  x = jnp.ones((8, MODEL_DIM))
  with pytest.raises(ValueError) as error:
    make("hash").init({"params": jax.random.key(0)}, x)
  assert str(error.value).splitlines()[0] == ("MoeLayer.router='hash' routes by token id: call "
                                              "it with token_ids and set num_token_ids (the id "
                                              "range)")  # JAX appends a traceback note
  with pytest.raises(ValueError, match="^balanced assignment needs the group size S=6 to be a "
                                       "multiple of num_experts=4$"):
    routing.balanced_assignment(jnp.zeros((1, 6, 4)))


# ---------------------------------------------------------------------------------------------
# X-MoE's cosine router


def test_cosine_router_scores_by_normalized_low_dimensional_similarity():
  x = jax.random.normal(jax.random.key(20), (32, MODEL_DIM))
  layer = make("cosine", router_settings={"embedding_dim": 4, "init_temperature": 0.5},
               capacity_factor=4.0)
  params, y, state = run(layer, x, deterministic=True)
  router = jax.tree.map(lambda a: np.asarray(a, np.float64), params["router"])
  assert router["log_temperature"] == pytest.approx(np.log(0.5))
  projected = np.asarray(x, np.float64) @ router["projection"]["kernel"]  # [T,4]
  embeddings = router["expert_embeddings"]  # [4,E]
  cosine = (projected / np.linalg.norm(projected, axis=-1, keepdims=True)) @ (
      embeddings / np.linalg.norm(embeddings, axis=0, keepdims=True))
  probs = np.exp(cosine / 0.5) / np.exp(cosine / 0.5).sum(-1, keepdims=True)
  experts = numpy_experts(params)
  expected = np.stack([probs[t].max() * experts[int(np.argmax(probs[t]))](np.asarray(x[t]))
                       for t in range(32)])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(stats_of(state)["max_logit"], (cosine / 0.5).max(), rtol=1e-5)
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x, mutable=MUTABLE)[0] ** 2)
  assert abs(float(jax.grad(loss)(params)["router"]["log_temperature"])) > 0


# ---------------------------------------------------------------------------------------------
# S-BASE


def numpy_sinkhorn(logits, valid, num_iters):
  cost = np.exp(logits - logits.max()) * valid[:, None]
  token, expert = np.ones(len(logits)), np.ones(logits.shape[1])
  for _ in range(num_iters):
    token = valid / valid.sum() / np.maximum(cost @ expert, 1e-30)  # padding rows carry 0
    expert = (1 / logits.shape[1]) / (token @ cost)
  return cost * token[:, None] * expert[None, :]


def test_sinkhorn_plan_is_balanced_and_equals_numpy():
  from moe_jax.routers.sinkhorn import sinkhorn_plan
  logits = jax.random.normal(jax.random.key(21), (2, 24, 4)) * 2 + jnp.array([3., 0, 0, 0])
  mask = jnp.ones((2, 24), bool).at[1, 20:].set(False)
  plan = np.asarray(sinkhorn_plan(logits, mask, num_iters=200))
  for g in range(2):
    valid = np.asarray(mask[g], np.float64)
    np.testing.assert_allclose(plan[g], numpy_sinkhorn(np.asarray(logits[g], np.float64), valid,
                                                       200), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(plan[g].sum(0), 0.25, rtol=1e-3)  # every expert 1 / E
    np.testing.assert_allclose(plan[g].sum(1), valid / valid.sum(), rtol=1e-3, atol=1e-7)


def test_sbase_balances_in_training_and_takes_the_argmax_in_evaluation():
  # Logits that send most tokens to expert 0: the plan's argmax spreads them.
  x = jax.random.normal(jax.random.key(22), (64, MODEL_DIM))
  layer = make("sbase", capacity_factor=4.0, group_size=64)
  params, _, _ = run(layer, x)
  bias = np.zeros((MODEL_DIM, NUM_EXPERTS), np.float32)
  bias[:, 0] = 0.5
  params["router"]["logits"]["kernel"] = params["router"]["logits"]["kernel"] + bias
  logits = np.asarray(x, np.float64) @ np.asarray(params["router"]["logits"]["kernel"],
                                                  np.float64)
  _, y_train, state = run(layer, x, params=params)
  _, y_eval, _ = run(layer, x, params=params, deterministic=True)
  from moe_jax.routers.sinkhorn import sinkhorn_plan
  chosen = np.argmax(np.asarray(sinkhorn_plan(jnp.asarray(logits[None], jnp.float32),
                                              num_iters=30))[0], -1)
  greedy = np.argmax(logits, -1)
  np.testing.assert_allclose(stats_of(state)["expert_load"],
                             np.bincount(chosen, minlength=NUM_EXPERTS) / 64)
  assert np.bincount(chosen, minlength=4).max() < np.bincount(greedy, minlength=4).max()
  experts = numpy_experts(params)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  for y, index in [(y_train, chosen), (y_eval, greedy)]:
    expected = np.stack([sigmoid(logits[t, index[t]]) * experts[index[t]](np.asarray(x[t]))
                         for t in range(64)])
    np.testing.assert_allclose(y, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Positive gates (ReMoE)


def test_positive_only_choices_skip_zero_gates_in_descending_order_by_hand():
  gates = jnp.array([[[0.0, 0.7, 0.2, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
  for capacity in (None, 1):
    out = routing.tokens_choose(gates, k=4, capacity=capacity, positive_only=True)
    assert out.selected_expert.tolist() == [[[1, 2, 4, 4], [0, 4, 4, 4], [4, 4, 4, 4]]]
    assert out.tokens_per_expert.tolist() == [[1, 1, 1, 0]]
  np.testing.assert_allclose(out.choice_gate[0, 0], [0.7, 0.2, 0, 0])  # C = 1: room for all
  assert out.slot_token[0, :, 0].tolist() == [1, 0, 0, 3]  # expert 3 empty (S = 3)


@pytest.fixture(scope="module")
def remoe():
  """A remoe layer (E = 4, k = 1, room for every choice; lambda_0 = 1e-3, alpha = 2), its tokens
  x and its {'params', 'router_state'} from init, shared by the tests (one compilation)."""
  x = jax.random.normal(jax.random.key(23), (32, MODEL_DIM))
  layer = make("remoe", group_size=16, capacity_factor=4.0, eval_capacity_factor=4.0,
               router_settings={"init_l1_weight": 1e-3, "l1_weight_multiplier": 2.0})
  variables = nn.meta.unbox(jax.jit(lambda x: layer.init({"params": jax.random.key(0)}, x,
                                                         deterministic=True))(x))
  return layer, x, {"params": variables["params"], "router_state": variables["router_state"]}


def test_remoe_equals_numpy_relu_gates_and_load_weighted_l1_on_every_path(remoe):
  layer, x, variables = remoe
  variables = {**variables, "router_state": {"router": {"l1_weight": jnp.float32(0.5)}}}
  gates = np.maximum(np.asarray(x, np.float64) @ np.asarray(
      variables["params"]["router"]["logits"]["kernel"], np.float64), 0)  # [T,E]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["experts"])
  outputs = [np.asarray(jax.nn.gelu(np.asarray(x) @ p["wi"][e])) @ p["wo"][e] for e in range(4)]
  expected = sum(gates[:, e:e + 1] * outputs[e] for e in range(4))  # [T,M]
  # lambda (1 / T) sum_t sum_e f_e g_te, f_e = E / (k T) #(g_e > 0), per group of 16, k = 1
  l1 = np.mean([4 / 16 * np.sum((gates[g] > 0).sum(0) * gates[g].sum(0)) / 16
                for g in (slice(0, 16), slice(16, 32))])
  for path in ("index", "dropless"):
    y, state = jax.jit(lambda v, x, path=path: layer.clone(dispatch_path=path).apply(
        v, x, deterministic=True, mutable=MUTABLE))(variables, x)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], 0.5 * l1, rtol=1e-5)
    stats = stats_of(state)
    assert float(stats["experts_per_token"]) == pytest.approx((gates > 0).sum(-1).mean())
    assert float(stats["dropped_fraction"]) == 0
  assert 1 < (gates > 0).sum(-1).mean() < 4  # some zero gates, more than k = 1 at init
  grads = jax.jit(jax.grad(lambda p: layer.apply(
      {**variables, "params": p}, x, deterministic=True,
      mutable=MUTABLE)[1]["losses"]["load_balance_loss"][0]))(variables["params"])
  assert float(jnp.abs(grads["router"]["logits"]["kernel"]).max()) > 0  # the L1 trains W


def test_remoe_l1_weight_steps_toward_the_target_sparsity_in_training_only(remoe):
  layer, x, variables = remoe
  assert "l1_weight" not in str(jax.tree_util.tree_structure(variables["params"]))
  weight = lambda state: float(state["router_state"]["router"]["l1_weight"])
  assert weight(variables) == pytest.approx(1e-3)  # init leaves lambda_0
  train = jax.jit(lambda v: layer.apply(v, x, deterministic=False,
                                        mutable=MUTABLE + ["router_state"])[1])
  # More than 1 of 4 gates positive (above): sparsity < the target 1 - 1/4, so lambda doubles...
  assert weight(train(variables)) == pytest.approx(2e-3)
  # ... and halves when every gate is 0 (sparsity 1).
  zero = jax.tree.map(jnp.zeros_like, variables["params"])
  state = train({**variables, "params": zero})
  assert weight(state) == pytest.approx(5e-4)
  assert float(stats_of(state)["unrouted_fraction"]) == 1  # no expert: the residual alone
  # With micro-batches the step's batch decides (routers.batch_total): a batch of 64 tokens with
  # 16 positive gates of 256 (sparsity 15/16) halves lambda, though these 32 are denser.
  totals = {"batch_counts": {"router": {"positive_gates": jnp.float32(16),
                                        "tokens": jnp.float32(64)}}}
  assert weight(train({**variables, **totals})) == pytest.approx(5e-4)
  state = jax.jit(lambda v: layer.apply(v, x, deterministic=True,
                                        mutable=MUTABLE + ["router_state"])[1])(variables)
  assert weight(state) == pytest.approx(1e-3)  # evaluation leaves it
  assert float(sparse_gates.l1_weight_update(jnp.float32(1.0), jnp.float32(0.75), 0.75,
                                             1.2)) == 1.0  # at the target: kept


@pytest.mark.parametrize("settings,message", [
    ({"init_l1_weight": 0.0}, "MoeLayer.remoe.init_l1_weight=0.0 must be > 0"),
    ({"l1_weight_multiplier": 0.5}, "MoeLayer.remoe.l1_weight_multiplier=0.5 must be >= 1")])
def test_remoe_settings_are_checked(settings, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    make("remoe", router_settings=settings)


# ---------------------------------------------------------------------------------------------
# DSelect-k


def test_smooth_step_is_the_papers_cubic_between_zero_and_one_by_hand():
  t = jnp.array([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
  # gamma = 1: -2 t^3 + 1.5 t + 0.5; 0.25 -> -1/32 + 3/8 + 1/2
  np.testing.assert_allclose(sparse_gates.smooth_step(t, 1.0),
                             [0, 0, 0.15625, 0.5, 0.84375, 1, 1], atol=1e-7)
  np.testing.assert_allclose(sparse_gates.smooth_step(2 * t, 2.0),
                             sparse_gates.smooth_step(t, 1.0), atol=1e-7)  # a function of t/gamma


def numpy_selectors(z, gamma):
  """z [..., K, B] -> [..., K, 2^B], expert by expert and bit by bit."""
  t = np.clip(z / gamma, -0.5, 0.5)
  step = -2 * t ** 3 + 1.5 * t + 0.5
  weights = np.ones(z.shape[:-1] + (2 ** z.shape[-1],))
  for e in range(2 ** z.shape[-1]):
    for b in range(z.shape[-1]):
      weights[..., e] *= step[..., b] if (e >> b) & 1 else 1 - step[..., b]
  return weights


def test_selector_weights_equal_numpy_sum_to_one_and_are_one_hot_when_saturated():
  z = np.asarray(jax.random.normal(jax.random.key(25), (5, 2, 3)), np.float64)  # E = 8
  got = np.asarray(sparse_gates.selector_weights(jnp.asarray(z, jnp.float32), 1.5))
  np.testing.assert_allclose(got, numpy_selectors(z, 1.5), atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1, rtol=1e-6)
  saturated = np.asarray(sparse_gates.selector_weights(jnp.array([[0.6, -0.7, 3.0]]), 1.0))
  assert saturated.tolist() == [[0, 0, 0, 0, 0, 1, 0, 0]]  # bits 1, 0, 1: expert 5


def test_dselect_k_layer_equals_numpy_with_the_entropy_regularizer():
  x = jax.random.normal(jax.random.key(26), (32, MODEL_DIM))
  layer = make("dselect_k", k=2, capacity_factor=2.0, eval_capacity_factor=2.0,
               router_settings={"gamma": 0.5})  # C = 16: room for every choice
  params = nn.meta.unbox(jax.jit(lambda x: layer.init(jax.random.key(0), x))(x))["params"]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["router"])
  xs = np.asarray(x, np.float64)

  def reference(kernel_scale):
    z = (xs @ (kernel_scale * p["selector_logits"]["kernel"]) + p["selector_logits"]["bias"])
    selectors = numpy_selectors(z.reshape(32, 2, 2), 0.5)  # [T,K,E]
    logits = xs @ p["selector_mix"]["kernel"] + p["selector_mix"]["bias"]
    mix = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    entropy = -(selectors * np.log(selectors + 1e-6)).sum((1, 2)).mean()
    return np.einsum("tk,tke->te", mix, selectors), entropy, np.abs(z) >= 0.25

  gates, _, _ = reference(1.0)
  assert (gates > 0).all()  # the reference init: no step saturated, every expert weighted
  params["router"]["selector_logits"]["kernel"] *= 300.0
  gates, entropy, saturated = reference(300.0)
  _, y, state = run(layer, x, params=params, deterministic=True)
  e = jax.tree.map(lambda a: np.asarray(a, np.float64), params["experts"])
  outputs = [np.asarray(jax.nn.gelu(xs @ e["wi"][i])) @ e["wo"][i] for i in range(4)]
  np.testing.assert_allclose(y, sum(gates[:, i:i + 1] * outputs[i] for i in range(4)),
                             atol=1e-5)
  np.testing.assert_allclose(gates.sum(-1), 1, rtol=1e-6)
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], entropy, rtol=1e-4)
  counts = (gates > 0).sum(-1)
  assert float(stats_of(state)["experts_per_token"]) == pytest.approx(counts.mean())
  assert (counts[saturated.all(-1)] <= 2).all() and saturated.all(-1).any()  # at most k
  assert float(stats_of(state)["max_logit"]) == 0 and float(state["losses"]["z_loss"][0]) == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=6), "MoeLayer.num_experts=6 must be a power of two >= 2 for "
                          "router='dselect_k' \\(each selector picks an expert by log2\\(E\\) "
                          "binary smooth steps\\)"),
    (dict(router_settings={"gamma": 0.0}), "MoeLayer.dselect_k.gamma=0.0 must be > 0"),
    (dict(jitter_eps=0.1), "MoeLayer.jitter_eps=0.1 and noise_std=0.0 must be 0 for "
                           "router='dselect_k' \\(no learned softmax over experts\\)")])
def test_dselect_k_settings_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    MoeLayer(**{"num_experts": NUM_EXPERTS, "expert_hidden_dim": HIDDEN, "router": "dselect_k",
                **kwargs})


# ---------------------------------------------------------------------------------------------
# MoE++ (zero-computation experts, gating residual)


def test_zero_computation_experts_by_hand():
  x = jnp.array([[[1.0, 2.0]]])
  gates = jnp.array([[[0.5, 0.25, 0.2]]])  # one zero, one copy, one constant expert
  module = experts_lib.ZeroComputationExperts(1, 1, 1)
  params = {"constants": jnp.array([[3.0, -1.0]]), "mix": {"kernel": jnp.zeros((2, 2))}}
  # a = softmax(0, 0) = (1/2, 1/2): 0.5 * 0 + 0.25 x + 0.2 (x / 2 + v / 2)
  np.testing.assert_allclose(module.apply({"params": params}, x, gates), [[[0.65, 0.6]]],
                             rtol=1e-6)


def numpy_moepp(x, prev, params, k=2):
  """y, logits, aux loss (tau = 0.75), zero-computation choices and FFN choices of one MoE++
  layer (E = 4 FFN experts, then 1 zero, 1 copy, 2 constant), nothing dropped, from the paper."""
  f64 = lambda a: np.asarray(a, np.float64)
  r, z = params["router"], params["zero_computation_experts"]
  logits = f64(x) @ f64(r["logits"]["kernel"]) + f64(prev) @ f64(r["gating_residual"]["kernel"])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  e = jax.tree.map(f64, params["experts"])
  gelu = lambda h: np.asarray(jax.nn.gelu(h))
  mix = (f64(x) @ f64(z["mix"]["kernel"])).reshape(len(x), 2, 2)
  mix = np.exp(mix) / np.exp(mix).sum(-1, keepdims=True)
  y, chosen = np.zeros(x.shape), np.zeros(probs.shape)
  for t, xt in enumerate(f64(x)):
    for i in np.argsort(-probs[t])[:k]:
      chosen[t, i] = 1
      if i < 4:
        out = gelu(xt @ e["wi"][i]) @ e["wo"][i]
      elif i == 4:
        out = 0 * xt
      elif i == 5:
        out = xt
      else:
        out = mix[t, i - 6, 0] * xt + mix[t, i - 6, 1] * f64(z["constants"][i - 6])
      y[t] += probs[t, i] * out
  eta = np.array([1, 1, 1, 1, 0.75, 0.75, 0.75, 0.75])
  aux = np.mean([8 * np.sum(chosen[g].mean(0) * (probs[g] * eta).mean(0))
                 for g in (slice(0, 16), slice(16, 32))])
  return y, logits, aux, chosen[:, 4:].sum(), chosen[:, :4].sum()


def test_moepp_layer_equals_numpy_with_gating_residual_on_every_path():
  x = jax.random.normal(jax.random.key(27), (32, MODEL_DIM))
  prev = jax.random.normal(jax.random.key(28), (32, 5))  # a previous layer of other width
  layer = make("moepp", capacity_factor=4.0, eval_capacity_factor=4.0)  # room for every choice
  init = jax.jit(lambda x, prev: layer.init(jax.random.key(0), x, router_logits=prev))
  params = nn.meta.unbox(init(x, prev))["params"]
  y_ref, logits_ref, aux, zero, ffn = numpy_moepp(x, prev, params)
  assert 0 < zero < 64 and zero + ffn == 64  # both kinds chosen, k = 2 each
  for path in ("index", "dropless"):
    (y, logits), state = jax.jit(lambda p, x, prev, path=path: layer.clone(
        dispatch_path=path).apply({"params": p}, x, router_logits=prev, deterministic=True,
                                  mutable=MUTABLE))(params, x, prev)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)
    np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], aux, rtol=1e-5)
    stats = stats_of(state)
    assert float(stats["zero_computation_share"]) == pytest.approx(zero / 64)
    assert float(stats["experts_per_token"]) == pytest.approx(ffn / 32)
    assert float(stats["dropped_fraction"]) == 0
  # The first MoE layer has no previous logits and no gating residual.
  first = nn.meta.unbox(jax.jit(lambda x: layer.init(jax.random.key(0), x))(x))["params"]
  assert set(first["router"]) == {"logits"}


def test_moepp_outputs_and_logits_of_a_token_do_not_depend_on_later_tokens():
  # C = 1 FFN slot per expert (capacity factor 0.25): drops happen, in token order.
  layer = make("moepp", causal=True, capacity_factor=0.25, min_capacity=1)
  x, prev = (jax.random.normal(jax.random.key(i), (16, width)) for i, width in ((29, 6), (30, 8)))
  params = nn.meta.unbox(jax.jit(lambda x: layer.init(jax.random.key(0), x,
                                                      router_logits=prev))(x))["params"]
  apply = jax.jit(lambda x: layer.apply({"params": params}, x, router_logits=prev,
                                        mutable=MUTABLE))
  (y, logits), state = apply(x)
  assert float(stats_of(state)["dropped_fraction"]) > 0
  (y2, logits2), _ = apply(x.at[9].set(1.0))
  np.testing.assert_array_equal(y2[:9], y[:9])
  np.testing.assert_array_equal(logits2[:9], logits[:9])


def test_moepp_sizes_capacity_and_flops_for_the_expected_ffn_choices():
  layer = make("moepp", router_settings={"num_constant": 0, "num_copy": 3})  # Z = 4
  # k E / (E + Z) = 2 * 4 / 8 = 1 FFN choice per token: C = ceil(1.25 * 16 / 4)
  assert layer.capacity(16, deterministic=False) == 5
  params, flops, experts = layer.router_cost(MODEL_DIM)
  assert experts == 1 and params == MODEL_DIM * 8 + 8 * 8 and flops == 2 * params


@pytest.mark.parametrize("settings,message", [
    ({"num_zero": -1}, "MoeLayer.moepp.num_zero=-1 must be >= 0"),
    ({"zero_balance_weight": 0.0}, "MoeLayer.moepp.zero_balance_weight=0.0 must be > 0")])
def test_moepp_settings_are_checked(settings, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    make("moepp", router_settings=settings)


# ---------------------------------------------------------------------------------------------
# StableMoE


@pytest.fixture(scope="module")
def stablemoe():
  """A stablemoe layer (E = 4, stage 1 for 2 steps, D = 3, alpha = 0.5, room for every token,
  the distilled router (x P) K), its tokens x, its {'params', 'router_state'} from init and a
  jitted apply(variables, x, deterministic) -> (y, state) with the state mutable, shared by the
  tests."""
  x = jax.random.normal(jax.random.key(29), (32, MODEL_DIM))
  layer = make("stablemoe", capacity_factor=4.0, eval_capacity_factor=4.0,
               router_settings={"distill_steps": 2, "distill_dim": 3, "balance_weight": 0.5,
                                "distilled_router": "projection"})
  variables = nn.meta.unbox(jax.jit(lambda x: layer.init({"params": jax.random.key(0)}, x,
                                                         deterministic=True))(x))
  apply = jax.jit(lambda v, x, deterministic: layer.apply(
      v, x, deterministic=deterministic, mutable=MUTABLE + ["router_state", "routing_trace"]),
      static_argnums=2)
  return layer, x, {"params": variables["params"], "router_state": variables["router_state"]}, apply


def at_step(variables, step, distilled=None):
  """variables with the router's step count, and its frozen distilled router when given."""
  state = {**variables["router_state"]["router"], "step": jnp.int32(step), **(distilled or {})}
  return {**variables, "router_state": {"router": state}}


def numpy_stablemoe(x, variables, stage1, alpha=0.5, ids=None):
  """(y [T,M], experts [T], aux loss) in float64, groups of 16: stage 1 routes by argmax x W
  and the distilled router ((x P) K, or V[ids] K given ids) is the live one, stage 2 routes by
  the frozen one."""
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  params, state = f64(variables["params"]), f64(variables["router_state"]["router"])
  x = np.asarray(x, np.float64)
  scores = x @ params["router"]["logits"]["kernel"]  # [T,E]
  distilled = params["router"] if stage1 else state
  d = (x @ distilled["distill_projection"] if ids is None
       else distilled["distill_embedding"][np.asarray(ids)]) @ distilled["distill_kernel"]
  learned = scores.argmax(-1)
  experts = learned if stage1 else d.argmax(-1)
  sigmoid = 1 / (1 + np.exp(-scores))
  gates = sigmoid[np.arange(32), experts]
  outputs = numpy_experts(variables["params"])
  y = np.stack([gates[t] * outputs[experts[t]](x[t]) for t in range(32)])
  balance = np.mean([sum((np.sum(learned[g] == e) - 16 / 4) / 16
                         * sigmoid[g][learned[g] == e, e].sum() / 16 for e in range(4))
                     for g in (slice(0, 16), slice(16, 32))])
  log_probs = d - np.log(np.exp(d).sum(-1, keepdims=True))
  distillation = -log_probs[np.arange(32), learned].mean()
  return y, experts, (alpha * balance + distillation) if stage1 else 0.0


def test_stablemoe_stages_equal_numpy_routing_gates_and_losses(stablemoe):
  layer, x, variables, apply = stablemoe
  frozen = {name: jax.random.normal(jax.random.key(i), variables["params"]["router"][name].shape)
            for i, name in enumerate(("distill_projection", "distill_kernel"))}
  experts = {}
  for step, stage1 in ((1, True), (2, False)):  # the last step of stage 1, the first of stage 2
    state_in = at_step(variables, step, frozen)
    y_ref, experts[step], aux = numpy_stablemoe(x, state_in, stage1)
    y, state = apply(state_in, x, True)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert np.asarray(state["routing_trace"]["choices"])[..., 0].reshape(-1).tolist() == (
        experts[step].tolist())
    np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], aux, rtol=1e-5)
  assert (experts[1] != experts[2]).any()  # the stages route differently here


def test_stablemoe_gradients_reach_the_routers_only_through_gates_and_losses(stablemoe):
  layer, x, variables, apply = stablemoe
  grad = lambda v, of: jax.jit(jax.grad(lambda p, x: of(layer.apply(
      {**v, "params": p}, x, deterministic=True, mutable=MUTABLE)), argnums=(0, 1)))(
          v["params"], x)
  output = lambda out: jnp.sum(out[0])
  aux = lambda out: out[1]["losses"]["load_balance_loss"][0]
  distilled = ("distill_projection", "distill_kernel")
  # Stage 2: the frozen copy routes; the output trains W through the gate alone.
  params, dx = grad(at_step(variables, 2), output)
  for name in distilled:
    assert float(jnp.abs(params["router"][name]).max()) == 0
  f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xs = np.asarray(x, np.float64)
  _, experts, _ = numpy_stablemoe(x, at_step(variables, 2), stage1=False)
  scores = xs @ f64["router"]["logits"]["kernel"]
  chosen = scores[np.arange(32), experts]
  slope = np.exp(-chosen) / (1 + np.exp(-chosen)) ** 2  # sigmoid'
  totals = np.array([numpy_experts(variables["params"])[e](xs[t]).sum()
                     for t, e in enumerate(experts)])
  expected = np.zeros((MODEL_DIM, NUM_EXPERTS))
  np.add.at(expected.T, experts, (slope * totals)[:, None] * xs)
  np.testing.assert_allclose(params["router"]["logits"]["kernel"], expected, atol=1e-4)
  params, _ = grad(at_step(variables, 2), aux)  # no losses in stage 2
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(params["router"]))
  # Stage 1, without the balance loss: the distillation trains P and K, neither W nor x.
  plain = layer.clone(router_settings={**layer.router_settings, "balance_weight": 0.0})
  grads = jax.jit(jax.grad(lambda p, x: plain.apply(
      {**variables, "params": p}, x, deterministic=True, mutable=MUTABLE)[1]["losses"][
          "load_balance_loss"][0], argnums=(0, 1)))(variables["params"], x)
  assert float(jnp.abs(grads[0]["router"]["logits"]["kernel"]).max()) == 0
  assert float(jnp.abs(grads[1]).max()) == 0
  for name in distilled:
    assert float(jnp.abs(grads[0]["router"][name]).max()) > 0


def test_stablemoe_embedding_router_routes_each_token_id_to_one_expert_in_stage_2():
  """The paper's distilled router, a word embedding V[id] K: stage 1 equals numpy and the
  distillation trains V's rows of the ids present and K alone; in stage 2 a token's expert
  depends on its id only."""
  layer = make("stablemoe", capacity_factor=4.0, eval_capacity_factor=4.0, num_token_ids=8,
               router_settings={"distill_steps": 2, "distill_dim": 3, "balance_weight": 0.5})
  x = jax.random.normal(jax.random.key(31), (32, MODEL_DIM))
  ids = jax.random.randint(jax.random.key(32), (32,), 0, 6)  # ids 6 and 7 never occur
  variables = nn.meta.unbox(jax.jit(lambda x, ids: layer.init(
      {"params": jax.random.key(0)}, x, token_ids=ids, deterministic=True))(x, ids))
  variables = {key: variables[key] for key in ("params", "router_state")}
  assert variables["params"]["router"]["distill_embedding"].shape == (8, 3)
  assert "distill_projection" not in variables["params"]["router"]
  apply = jax.jit(lambda v, x: layer.apply(v, x, token_ids=ids, deterministic=True,
                                           mutable=MUTABLE + ["routing_trace"]))
  frozen = {"distill_embedding": jax.random.normal(jax.random.key(5), (8, 3)),
            "distill_kernel": jax.random.normal(jax.random.key(6), (3, 4))}
  for step, stage1 in ((1, True), (2, False)):
    state_in = at_step(variables, step, frozen)
    y_ref, experts, aux = numpy_stablemoe(x, state_in, stage1, ids=ids)
    y, state = apply(state_in, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], aux, rtol=1e-5)
  by_id = np.asarray(frozen["distill_embedding"] @ frozen["distill_kernel"]).argmax(-1)
  other_x = apply(at_step(variables, 2, frozen), -3.0 * x)[1]  # other tokens, the same ids
  for out in (state, other_x):
    assert np.asarray(out["routing_trace"]["choices"])[..., 0].reshape(-1).tolist() == (
        by_id[np.asarray(ids)].tolist())
  plain = layer.clone(router_settings={**layer.router_settings, "balance_weight": 0.0})
  grads = jax.jit(jax.grad(lambda p: plain.apply(
      {**variables, "params": p}, x, token_ids=ids, deterministic=True, mutable=MUTABLE)[1][
          "losses"]["load_balance_loss"][0]))(variables["params"])["router"]
  assert float(jnp.abs(grads["logits"]["kernel"]).max()) == 0
  assert float(jnp.abs(grads["distill_kernel"]).max()) > 0
  rows = np.abs(np.asarray(grads["distill_embedding"])).max(-1)
  assert (rows[:6] > 0).all() and (rows[6:] == 0).all()


def test_stablemoe_step_count_moves_in_training_only_and_freezes_the_distilled_router(stablemoe):
  layer, x, variables, apply = stablemoe
  state = lambda out: jax.device_get(out[1]["router_state"]["router"])
  assert int(variables["router_state"]["router"]["step"]) == 0  # init leaves 0
  assert variables["router_state"]["router"]["step"].dtype == jnp.int32
  assert "step" not in variables["params"]["router"]
  assert int(state(apply(variables, x, True))["step"]) == 0  # evaluation leaves it
  frozen = {"distill_projection": jnp.zeros((MODEL_DIM, 3)), "distill_kernel": jnp.zeros((3, 4))}
  after = state(apply(at_step(variables, 1, frozen), x, False))  # stage 1's last training call
  assert int(after["step"]) == 2
  for name in frozen:  # the copy is of the live parameters
    np.testing.assert_array_equal(after[name], variables["params"]["router"][name])
  moved = jax.tree.map(lambda a: a + 1.0, variables["params"])
  later = state(apply({"params": moved, "router_state": {"router": after}}, x, False))
  assert int(later["step"]) == 3
  for name in frozen:  # stage 2 keeps the copy whatever the parameters do
    np.testing.assert_array_equal(later[name], after[name])


@pytest.mark.parametrize("kwargs,message", [
    (dict(router_settings={"distill_steps": -1}),
     "MoeLayer.stablemoe.distill_steps=-1 must be >= 0"),
    (dict(router_settings={"distill_dim": 0}), "MoeLayer.stablemoe.distill_dim=0 must be >= 1"),
    (dict(router_settings={"balance_weight": -0.1}),
     "MoeLayer.stablemoe.balance_weight=-0.1 must be >= 0"),
    (dict(router_settings={"distilled_router": "word"}), "MoeLayer.stablemoe.distilled_router="
     "'word' is unknown; allowed: 'embedding', 'projection'"),
    (dict(k=2), "MoeLayer.k=2: router='stablemoe' always chooses 1 expert; use router='topk' "
                "for k=2"),
    (dict(jitter_eps=0.01), "MoeLayer.jitter_eps=0.01 and noise_std=0.0 must be 0 for "
                            "router='stablemoe' \\(no learned softmax over experts\\)")])
def test_stablemoe_settings_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    make("stablemoe", **kwargs)


# SMEAR (merged experts)


def numpy_smear(x, valid, router_kernel, wi, wo):
  """x [G,S,M] float64 -> y [G,S,M] (0 for padding) and the merge weights [G,E], written from
  the paper: per group, the mean router probability of its real tokens weights each expert's
  kernels into one FFN."""
  y, weights = np.zeros_like(x), []
  for g in range(x.shape[0]):
    real = x[g, valid[g]]
    logits = real @ router_kernel
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    w = (probs / probs.sum(-1, keepdims=True)).mean(0)
    merged_in, merged_out = np.tensordot(w, wi, 1), np.tensordot(w, wo, 1)
    y[g, valid[g]] = np.asarray(jax.nn.gelu(real @ merged_in)) @ merged_out
    weights.append(w)
  return y, np.array(weights)


@pytest.fixture(scope="module")
def smear():
  """The layer on 2 groups of 6 tokens, the last token of group 1 padding (nonzero: it must not
  count), its params and float64 inputs."""
  layer = make("smear", group_size=6, dispatch_path="merge")
  x = np.asarray(jax.random.normal(jax.random.key(8), (2, 6, MODEL_DIM)), np.float64)
  mask = np.ones((2, 6), bool)
  mask[1, 5] = False
  params = run(layer, jnp.array(x, jnp.float32), token_mask=jnp.array(mask))[0]
  return layer, params, x, mask


def test_smear_output_is_each_groups_merged_ffn_and_padding_does_not_count(smear):
  layer, params, x, mask = smear
  _, y, state = run(layer, jnp.array(x, jnp.float32), params, token_mask=jnp.array(mask))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected, weights = numpy_smear(x, mask, p["router"]["logits"]["kernel"],
                                  p["experts"]["wi"], p["experts"]["wo"])
  np.testing.assert_allclose(y, expected, atol=2e-5)
  assert np.all(y[1, 5] == 0)
  stats = stats_of(state)
  entropy = -(weights * np.log(weights)).sum(-1).mean()
  np.testing.assert_allclose(stats["merge_entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(stats["expert_load"], weights.T @ mask.sum(1) / mask.sum(),
                             rtol=1e-5)
  assert stats["dropped_fraction"] == 0 and stats["experts_per_token"] == NUM_EXPERTS
  assert float(state["losses"]["load_balance_loss"][0]) == 0.0
  logits = x[mask] @ p["router"]["logits"]["kernel"]  # the z-loss over real tokens, as usual
  z_loss = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  np.testing.assert_allclose(state["losses"]["z_loss"][0], z_loss, rtol=1e-5)


def test_smear_router_gradient_equals_an_independent_jnp_reference(smear):
  layer, params, x, mask = smear
  x, valid = jnp.array(x, jnp.float32), jnp.array(mask)
  target = jax.random.normal(jax.random.key(9), x.shape)

  def reference(router_kernel):
    probs = jax.nn.softmax(x @ router_kernel)  # [G,S,E]
    weights = (probs * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)  # [G,E]
    wi = jnp.einsum("ge,emh->gmh", weights, params["experts"]["wi"])
    wo = jnp.einsum("ge,ehm->ghm", weights, params["experts"]["wo"])
    y = jnp.einsum("gsh,ghm->gsm", jax.nn.gelu(jnp.einsum("gsm,gmh->gsh", x, wi)), wo)
    return jnp.sum(y * target * valid[..., None])

  def layer_loss(router_kernel):
    p = {**params, "router": {"logits": {"kernel": router_kernel}}}
    return jnp.sum(layer.apply({"params": p}, x, valid, mutable=MUTABLE)[0] * target)

  kernel = params["router"]["logits"]["kernel"]
  got, expected = jax.jit(jax.grad(layer_loss))(kernel), jax.jit(jax.grad(reference))(kernel)
  assert float(jnp.abs(expected).max()) > 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_smear_costs_one_ffn_per_token_plus_the_merge_by_hand():
  info = {"image_shape": (28, 28, 1), "num_classes": 10}
  config = common.vit("smear")
  moe, m, h = config.model.moe, config.model.width, config.model.mlp_dim
  assert (moe.group_size, moe.dispatch_path, moe.expert_hidden_dim) == (50, "merge", h)
  router, merge = 2 * m * 8, 2 * 8 * (2 * m * h) / 50  # per token: logits; E experts / S
  dense = models.flop_counts(common.vit("dense").model, info)
  counts = models.flop_counts(config.model, info)
  assert counts["active_flops_per_token"] == pytest.approx(
      dense["active_flops_per_token"] + 2 * (router + merge))  # MoE layers 1 and 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(router="smear", dispatch_path="index"),
     "MoeLayer.dispatch_path='index' takes the routing forms 'choices', 'slots', not the "
     "'merge' form of router='smear'; allowed paths for it: 'merge'"),
    (dict(router="topk", dispatch_path="merge"),
     "MoeLayer.dispatch_path='merge' takes the routing forms 'merge', not the 'choices' form "
     "of router='topk'; allowed paths for it: 'einsum', 'index', 'dropless'"),
    (dict(router="smear", dispatch_path="merge", group_size=None),
     r"MoeLayer.group_size=None \(automatic\) does not suit router='smear'; set it"),
    (dict(router="smear", dispatch_path="merge", k=1),
     r"MoeLayer.k=1 is not used by router='smear'; set capacity_factor"),
])
def test_smear_layer_settings_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}"):
    make(**kwargs)


def test_smear_is_refused_in_the_lm_and_expert_parallel():
  with pytest.raises(ValueError, match=r"^MoeLayer.router='smear' reads future tokens and is "
                                       r"invalid in a causal decoder; allowed there: 'switch'"):
    models.layer_plan(common.lm("smear").model, {"vocab_size": 256, "seq_len": 128})
  layer = make("smear", dispatch_path="merge", expert_parallel="gspmd")
  mesh = sharding.make_mesh({"data": -1, "expert": 2, "model": 1})
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match=r"^dispatch_path='merge' does not run expert-parallel: set "
                        r"expert_parallel='none', not 'gspmd' \(on a mesh with expert axis 2\)"):
    jax.eval_shape(lambda x: layer.init({"params": jax.random.key(0)}, x), jnp.ones((8, 6)))
