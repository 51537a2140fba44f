"""The top-k options of the production stacks (score function, renormalization, routed scaling,
group-limited routing, per-k balancing) against hand-computed cases and numpy references."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.layers import MoeLayer

MUTABLE = ["losses", "routing_stats"]
SCORES = {"softmax": lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True),
          "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
          "sqrtsoftplus": lambda z: np.sqrt(np.log1p(np.exp(z)))}


def numpy_groups_allowed(scores, num_groups, groups_chosen, k):
  """[T,E] bool: the experts of each token's groups_chosen best groups (sum of top k / chosen)."""
  tokens, experts = scores.shape
  grouped = scores.reshape(tokens, num_groups, experts // num_groups)
  group_scores = -np.sort(-grouped, axis=-1)[..., :k // groups_chosen].sum(-1)
  allowed = np.zeros((tokens, num_groups), bool)
  for t in range(tokens):
    allowed[t, np.argsort(-group_scores[t], kind="stable")[:groups_chosen]] = True
  return np.repeat(allowed, experts // num_groups, axis=-1)


def test_group_limit_keeps_the_best_group_by_hand():
  # Groups {0, 1} and {2, 3}; top-2 alone picks experts 0 and 2. Group scores (top-2 sums)
  # 0.9 and 0.89: with one group chosen, the token takes experts 0 and 1.
  scores = jnp.array([[[0.5, 0.4, 0.45, 0.44]]])
  assert routing.tokens_choose(scores, k=2, capacity=None).choice_expert.tolist() == [[[0, 2]]]
  bias = routing.group_limit_bias(scores, num_groups=2, groups_chosen=1, k=2)
  np.testing.assert_array_equal(bias, [[[0, 0, -np.inf, -np.inf]]])
  out = routing.tokens_choose(scores, k=2, capacity=None, selection_bias=bias)
  assert out.choice_expert.tolist() == [[[0, 1]]]
  np.testing.assert_allclose(out.choice_gate, [[[0.5, 0.4]]])  # gates stay the scores


@pytest.mark.parametrize("num_groups,groups_chosen,k", [(4, 2, 4), (8, 4, 8), (2, 1, 3)])
def test_group_limit_equals_numpy(num_groups, groups_chosen, k):
  scores = jax.random.uniform(jax.random.key(k), (3, 20, 16))
  bias = routing.group_limit_bias(scores, num_groups=num_groups, groups_chosen=groups_chosen,
                                  k=k)
  allowed = numpy_groups_allowed(np.asarray(scores).reshape(60, 16), num_groups, groups_chosen,
                                 k)
  np.testing.assert_array_equal(np.asarray(bias).reshape(60, 16) == 0, allowed)
  chosen = routing.tokens_choose(scores, k=k, capacity=None, selection_bias=bias).choice_expert
  masked = np.where(allowed, np.asarray(scores).reshape(60, 16), -np.inf)
  np.testing.assert_array_equal(np.sort(np.asarray(chosen).reshape(60, k), -1),
                                np.sort(np.argsort(-masked, -1)[:, :k], -1))


def layer_and_params(router="topk", **settings):
  layer = MoeLayer(num_experts=8, expert_hidden_dim=8, router=router, group_size=12,
                   capacity_factor=8.0, k=4, router_settings=settings)  # room for every choice
  x = jax.random.normal(jax.random.key(3), (12, 6))
  variables = nn.meta.unbox(layer.init({"params": jax.random.key(4)}, x, deterministic=True))
  return layer, x, {k: v for k, v in variables.items() if k in ("params", "router_state")}


@pytest.mark.parametrize("score_function,renormalize,scaling_factor,groups", [
    ("softmax", False, 1.0, (1, 1)), ("sigmoid", True, 2.5, (1, 1)),
    ("sqrtsoftplus", True, 1.0, (4, 2)), ("sigmoid", False, 1.0, (2, 1))])
def test_top_k_options_equal_a_numpy_layer(score_function, renormalize, scaling_factor, groups):
  layer, x, variables = layer_and_params(
      score_function=score_function, renormalize=renormalize, scaling_factor=scaling_factor,
      num_expert_groups=groups[0], top_expert_groups=groups[1], balance_per_k=True)
  y, state = layer.apply(variables, x, deterministic=True, mutable=MUTABLE)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  scores = SCORES[score_function](np.asarray(x, np.float64) @ p["router"]["logits"]["kernel"])
  allowed = numpy_groups_allowed(scores, *groups, 4)
  expected, chosen_mask = np.zeros(x.shape), np.zeros(scores.shape)
  for t in range(12):
    chosen = np.argsort(-np.where(allowed[t], scores[t], -np.inf))[:4]
    chosen_mask[t, chosen] = 1
    gates = scores[t, chosen] / (scores[t, chosen].sum() if renormalize else 1.0)
    for e, gate in zip(chosen, scaling_factor * gates):
      hidden = np.asarray(jax.nn.gelu(np.asarray(x[t], np.float64) @ p["experts"]["wi"][e]))
      expected[t] += gate * (hidden @ p["experts"]["wo"][e])
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  # The balancing loss on scores normalized to sum to 1, divided by k = 4 (per-k).
  probs = scores / scores.sum(-1, keepdims=True)
  balance = 8 * np.sum(chosen_mask.mean(0) * probs.mean(0)) / 4
  np.testing.assert_allclose(state["losses"]["load_balance_loss"][0], balance, rtol=1e-5)


def test_per_k_balance_gives_one_under_uniform_routing():
  probs = jnp.full((1, 8, 4), 0.25)
  expert_mask = jax.nn.one_hot(jnp.array([[0, 1, 2, 3] * 2]), 4) + jax.nn.one_hot(
      jnp.array([[1, 2, 3, 0] * 2]), 4)  # two choices per token, every expert equally
  assert float(routing.load_balancing_loss(probs, expert_mask)) == pytest.approx(2.0)  # k
  layer, x, variables = layer_and_params(balance_per_k=True)
  plain, _, _ = layer_and_params()
  losses = [m.apply(variables, x, deterministic=True, mutable=MUTABLE)[1]["losses"][
      "load_balance_loss"][0] for m in (layer, plain)]
  assert float(losses[0]) == pytest.approx(float(losses[1]) / 4)


def test_loss_free_ranks_groups_by_the_biased_scores_and_gates_by_the_scores():
  layer, x, variables = layer_and_params("loss_free", score_function="sigmoid",
                                         num_expert_groups=4, top_expert_groups=2)
  bias = jnp.array([0., 0., 0., 0., 0., 0., 5., 5.])  # group 3 (experts 6, 7) always wins
  variables = {**variables, "router_state": {"router": {"bias": bias}}}
  _, state = layer.apply(variables, x, deterministic=True, mutable=MUTABLE)
  load = np.asarray(state["routing_stats"]["stats"][0]["expert_load"])
  assert load[6] == load[7] == pytest.approx(0.25)  # in every token's top-4
  assert float(state["losses"]["load_balance_loss"][0]) == 0.0


def test_drop_policy_probs_keeps_each_experts_highest_scoring_choices_by_hand():
  # Top-1, one slot per expert. Expert 0 is asked by tokens 0 (0.6) and 1 (0.9), expert 1 by
  # tokens 2 (0.7) and 3 (0.8): by position the first askers stay, by score the later ones.
  probs = jnp.array([[[.6, .4], [.9, .1], [.3, .7], [.2, .8]]])
  position = routing.tokens_choose(probs, k=1, capacity=1)
  assert position.slot_token.tolist() == [[[0], [2]]]
  by_score = routing.tokens_choose(probs, k=1, capacity=1, drop_policy="probs")
  assert by_score.slot_token.tolist() == [[[1], [3]]]
  assert by_score.choice_expert.tolist() == [[[2], [0], [2], [1]]]  # 2 = E: dropped
  np.testing.assert_allclose(by_score.slot_gate, [[[.9], [.8]]])


def test_drop_policy_probs_equals_numpy_with_two_choices():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(7), (2, 16, 4)) * 2)
  out = routing.tokens_choose(probs, k=2, capacity=5, drop_policy="probs")
  p = np.asarray(probs)
  for g in range(2):
    top = np.argsort(-p[g], axis=-1, kind="stable")[:, :2]  # [S,K]
    for e in range(4):
      askers = [(p[g, s, e], s) for s in range(16) if e in top[s]]
      kept = sorted(askers, key=lambda a: -a[0])[:5]
      assert sorted(np.asarray(out.slot_token[g, e])[:len(kept)].tolist()) == sorted(
          s for _, s in kept)


def test_shared_expert_gate_scales_the_shared_experts_by_a_learned_sigmoid():
  x = jax.random.normal(jax.random.key(8), (12, 6))
  gated = MoeLayer(num_experts=4, expert_hidden_dim=8, router="topk", group_size=12,
                   num_shared_experts=1, shared_expert_gate=True)
  plain = gated.clone(shared_expert_gate=False)
  variables = nn.meta.unbox(gated.init({"params": jax.random.key(9)}, x, deterministic=True))
  params = variables["params"]
  assert params["shared_expert_gate"]["kernel"].shape == (6, 1)
  y = gated.apply({"params": params}, x, deterministic=True)
  without = {k: v for k, v in params.items() if k != "shared_expert_gate"}
  y_plain = plain.apply({"params": without}, x, deterministic=True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = np.asarray(x, np.float64)
  shared = np.asarray(jax.nn.gelu(xs @ p["shared_experts"]["wi"])) @ p["shared_experts"]["wo"]
  gate = 1 / (1 + np.exp(-(xs @ p["shared_expert_gate"]["kernel"])))
  np.testing.assert_allclose(y - y_plain, (gate - 1) * shared, atol=1e-5)


@pytest.mark.parametrize("skew", [0.0, 1.0])
def test_forced_router_loads_experts_by_the_chosen_shares(skew):
  x = jax.random.normal(jax.random.key(10), (2 * 40, 6))
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="forced", k=2, group_size=40,
                   dispatch_path="dropless", router_settings={"skew": skew})
  variables = nn.meta.unbox(layer.init({"params": jax.random.key(11)}, x))
  assert "router" not in variables["params"]  # nothing learned
  _, state = layer.apply(variables, x, mutable=MUTABLE)
  # numpy: position s of 40 in the cumulative shares (e + 1)^-skew; experts q_s and q_s + 1.
  shares = (np.arange(4) + 1.0) ** -skew
  first = np.minimum(np.searchsorted(np.cumsum(shares / shares.sum()),
                                     (np.arange(40) + 0.5) / 40), 3)
  counts = np.bincount(np.concatenate([first, (first + 1) % 4]), minlength=4)
  if skew == 0:
    assert counts.tolist() == [20, 20, 20, 20]  # exact balance: S k / E each
  stats = state["routing_stats"]["stats"][0]
  np.testing.assert_allclose(stats["expert_load"], counts / 80, rtol=1e-6)
  assert float(state["losses"]["load_balance_loss"][0]) == 0.0
  params = jax.tree.map(np.asarray, variables["params"]["experts"])
  xs = np.asarray(x[:40], np.float64)
  expected = np.stack([sum(0.5 * np.asarray(jax.nn.gelu(xs[s] @ params["wi"][e]))
                           @ params["wo"][e] for e in (first[s], (first[s] + 1) % 4))
                       for s in range(40)])
  np.testing.assert_allclose(layer.apply(variables, x)[:40], expected, atol=1e-5)


def numpy_balance(probs, chosen, valid):
  """E * sum_e f_e P_e over the tokens where valid (f: share of tokens choosing e)."""
  probs, chosen = probs[valid], chosen[valid]
  return probs.shape[-1] * np.sum(chosen.mean(0) * probs.mean(0))


def test_segment_balancing_loss_by_hand_and_equals_the_group_loss_for_one_segment_per_group():
  # One segment of two tokens, E = 2: f = (1/2, 1/2), P = (0.6, 0.4): 2 * (0.3 + 0.2) = 1.
  probs = jnp.array([[[0.9, 0.1], [0.3, 0.7]]])
  chosen = jnp.array([[[1, 0], [0, 1]]])
  assert float(routing.segment_balancing_loss(probs, chosen, jnp.zeros((1, 2), int), 1)) == (
      pytest.approx(1.0))
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(12), (3, 5, 4)))
  chosen = jax.nn.one_hot(jnp.argmax(probs, -1), 4)
  mask = jnp.ones((3, 5)).at[2, 3:].set(0)
  groups = jnp.broadcast_to(jnp.arange(3)[:, None], (3, 5))
  np.testing.assert_allclose(routing.segment_balancing_loss(probs, chosen, groups, 3, mask),
                             routing.load_balancing_loss(probs, chosen, mask), rtol=1e-6)


def test_layer_sows_sequence_and_global_balance_losses_across_groups_by_numpy():
  # 3 sequences of 8 tokens in groups of 6: groups cut across sequences; the last sequence's
  # final 3 tokens are padding and count nowhere.
  x = jax.random.normal(jax.random.key(13), (3, 8, 6))
  mask = jnp.ones((3, 8)).at[2, 5:].set(0)
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="topk", group_size=6,
                   capacity_factor=4.0, router_settings={"balance_per_k": True})
  variables = nn.meta.unbox(layer.init({"params": jax.random.key(14)}, x, mask,
                                       deterministic=True))
  _, state = layer.apply({"params": variables["params"]}, x, mask, deterministic=True,
                         mutable=MUTABLE)
  kernel = np.asarray(variables["params"]["router"]["logits"]["kernel"], np.float64)
  logits = np.asarray(x, np.float64) @ kernel  # [3,8,4]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top2 = np.argsort(-probs, -1)[..., :2]
  chosen = (np.arange(4) == top2[..., :1]) | (np.arange(4) == top2[..., 1:])  # [3,8,4]
  valid = np.asarray(mask, bool)
  per_sequence = np.mean([numpy_balance(probs[b], chosen[b], valid[b]) for b in range(3)])
  losses = state["losses"]
  np.testing.assert_allclose(losses["seq_balance_loss"][0], per_sequence / 2, rtol=1e-5)
  np.testing.assert_allclose(losses["global_balance_loss"][0],
                             numpy_balance(probs, chosen, valid) / 2, rtol=1e-5)


def test_top_p_keeps_experts_until_their_probability_reaches_p_by_hand():
  probs = jnp.array([[[0.5, 0.3, 0.15, 0.05], [0.3, 0.28, 0.22, 0.2]]])
  for p, experts in [(0.4, [[0], [0, 1]]), (0.6, [[0, 1], [0, 1, 2]])]:
    out = routing.tokens_choose(probs, k=4, capacity=None, top_p=p)
    kept = [[int(e) for e in row if e < 4] for row in out.choice_expert[0]]
    assert kept == experts
  np.testing.assert_allclose(out.choice_gate[0, 1], [0.3, 0.28, 0.22, 0])  # not renormalized
  assert out.tokens_per_expert.tolist() == [[2, 2, 1, 0]]


def test_top_p_router_equals_numpy_and_reports_its_experts_per_token():
  layer, x, variables = layer_and_params("top_p", p=0.5)
  y, state = layer.apply(variables, x, deterministic=True, mutable=MUTABLE)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  probs = SCORES["softmax"](np.asarray(x, np.float64) @ params["router"]["logits"]["kernel"])
  expected, counts = np.zeros(x.shape), []
  for t in range(12):
    order = np.argsort(-probs[t])[:4]  # k = 4 at most
    chosen = [e for i, e in enumerate(order) if probs[t, order[:i]].sum() < 0.5]
    counts.append(len(chosen))
    for e in chosen:
      hidden = np.asarray(jax.nn.gelu(np.asarray(x[t], np.float64) @ params["experts"]["wi"][e]))
      expected[t] += probs[t, e] * (hidden @ params["experts"]["wo"][e])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  stats = state["routing_stats"]["stats"][0]
  assert float(stats["experts_per_token"]) == pytest.approx(np.mean(counts))
  assert 1 < np.mean(counts) < 4


X64_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from moe_jax.layers import MoeLayer
x = jax.random.normal(jax.random.key(0), (2, 8, 16), jnp.float32)
layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router="topk", k=2, group_size=8,
                 router_dtype="float64")
variables = layer.init(jax.random.key(1), x)
y, state = layer.apply(variables, x, mutable=["intermediates"])
logits = state["intermediates"]["router"]["router_logits"][0]
kernel = np.asarray(variables["params"]["router"]["logits"]["kernel"], np.float64)
reference = np.asarray(x, np.float64) @ kernel
probs = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
grads = jax.grad(lambda v: layer.apply(v, x).sum())(variables)["params"]
print(logits.dtype, y.dtype, grads["router"]["logits"]["kernel"].dtype,
      np.abs(np.asarray(logits) - reference).max(),
      np.abs(state["intermediates"]["decisions"][0]["probs"] - probs).max())
"""


def test_router_dtype_float64_computes_the_logits_in_float64_and_the_rest_in_float32():
  """In a process with 64-bit JAX (router_dtype='float64' refuses to run without it)."""
  env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  done = subprocess.run([sys.executable, "-c", X64_CHECK], capture_output=True, text=True,
                        env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  logits, output, grad, logit_error, prob_error = done.stdout.split()
  assert (logits, output, grad) == ("float64", "float32", "float32")
  assert float(logit_error) < 1e-15  # against numpy's float64 x W
  assert float(prob_error) < 1e-7  # the float32 probabilities the losses and statistics read
