"""Routing numbers against hand-computed cases and the naive loop reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routers, routing
from tests import reference

EMPTY = -1  # marks an empty slot in the expected tables below (the code stores S there)


def slots(out):
  """slot_token with empty slots as EMPTY, for readable comparisons."""
  group_size = out.probs.shape[1]
  table = np.asarray(out.slot_token)
  return np.where(table == group_size, EMPTY, table).tolist()


def test_expert_capacity():
  assert routing.expert_capacity(16, 4, k=2, capacity_factor=1.25) == 10
  assert routing.expert_capacity(100, 8, k=1, capacity_factor=1.0) == 13  # ceil(12.5)
  assert routing.expert_capacity(8, 8, k=1, capacity_factor=1.0) == 4  # min_capacity
  assert routing.expert_capacity(8, 8, k=1, capacity_factor=1.0, min_capacity=0) == 1
  with pytest.raises(ValueError, match=r"^capacity_factor=0 must be > 0$"):
    routing.expert_capacity(8, 8, capacity_factor=0)


def test_top1_capacity_overflow_drops_later_tokens():
  # Top-1 experts: e0, e0, e0, e1. Capacity 2: token 2 finds e0 full and is dropped.
  probs = jnp.array([[[.9, .1], [.8, .2], [.7, .3], [.4, .6]]])
  out = routing.tokens_choose(probs, k=1, capacity=2)
  assert slots(out) == [[[0, 1], [3, EMPTY]]]
  np.testing.assert_allclose(out.slot_gate, [[[.9, .8], [.6, 0]]], rtol=1e-6)
  np.testing.assert_array_equal(out.tokens_per_expert, [[3, 1]])
  np.testing.assert_array_equal(out.kept_per_expert, [[2, 1]])
  # f = [3/4, 1/4], P = [.7, .3]: 2 * (.75 * .7 + .25 * .3) = 1.2
  np.testing.assert_allclose(out.aux_loss, 1.2, rtol=1e-6)
  dispatch = np.zeros((1, 4, 2, 2), bool)
  dispatch[0, 0, 0, 0] = dispatch[0, 1, 0, 1] = dispatch[0, 3, 1, 0] = True
  np.testing.assert_array_equal(out.dispatch_mask(), dispatch)
  np.testing.assert_allclose(out.combine_tensor(), dispatch * np.asarray(probs)[..., None], rtol=1e-6)


def test_top2_is_k_major():
  # Token 0 wants (e0, e1), token 1 wants (e1, e0); one slot each. First choices claim both
  # slots before token 0's second choice is considered, so both second choices drop.
  probs = jnp.array([[[.7, .3], [.4, .6]]])
  out = routing.tokens_choose(probs, k=2, capacity=1)
  assert slots(out) == [[[0], [1]]]
  np.testing.assert_array_equal(out.kept_per_expert, [[1, 1]])


def test_top2_overflow_and_renormalize():
  # 1st choices: t0->e0, t1->e0, t2->e0 (dropped, e0 holds 2); 2nd: t0->e1, t1->e2, t2->e1.
  probs = jnp.array([[[.5, .3, .2], [.6, .1, .3], [.45, .35, .2]]])
  out = routing.tokens_choose(probs, k=2, capacity=2, renormalize=True)
  assert slots(out) == [[[0, 1], [0, 2], [1, EMPTY]]]
  np.testing.assert_allclose(
      out.slot_gate, [[[.5 / .8, .6 / .9], [.3 / .8, .35 / .8], [.3 / .9, 0]]], rtol=1e-6)
  np.testing.assert_array_equal(out.tokens_per_expert, [[3, 2, 1]])
  np.testing.assert_array_equal(out.kept_per_expert, [[2, 2, 1]])


def test_batch_prioritized_fills_by_top1_probability():
  probs = jnp.array([[[.6, .4], [.9, .1], [.3, .7]]])
  in_order = routing.tokens_choose(probs, k=1, capacity=1)
  prioritized = routing.tokens_choose(probs, k=1, capacity=1, batch_prioritized=True)
  assert slots(in_order) == [[[0], [2]]]
  assert slots(prioritized) == [[[1], [2]]]  # token 1 (p=.9) beats token 0 (p=.6) to e0


def test_padding_takes_no_slot_and_no_loss():
  probs = jnp.array([[[.9, .1], [.8, .2], [.3, .7]]])
  mask = jnp.array([[False, True, True]])
  out = routing.tokens_choose(probs, k=1, capacity=1, token_mask=mask)
  assert slots(out) == [[[1], [2]]]
  np.testing.assert_array_equal(out.tokens_per_expert, [[1, 1]])
  # The loss over the two real tokens only: f = [.5, .5], P = [.55, .45] -> 2 * .5 = 1.0
  np.testing.assert_allclose(out.aux_loss, 1.0, rtol=1e-6)
  # A second group of padding alone (padding examples at the end of a batch) does not count.
  top1 = jax.nn.one_hot(jnp.argmax(probs, -1), 2)
  loss = routing.load_balancing_loss(jnp.concatenate([probs, probs]),
                                     jnp.concatenate([top1, top1]),
                                     jnp.concatenate([mask, jnp.zeros_like(mask)]))
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_expert_choice_hand_case_and_padding():
  probs = jnp.array([[[.9, .1], [.6, .4], [.3, .7], [.2, .8]]])
  out = routing.experts_choose(probs, capacity=2)
  assert slots(out) == [[[0, 1], [3, 2]]]
  np.testing.assert_allclose(out.slot_gate, [[[.9, .6], [.8, .7]]], rtol=1e-6)
  assert float(out.aux_loss) == 0.0
  masked = routing.experts_choose(probs, capacity=2, token_mask=jnp.array([[0, 1, 1, 1]]))
  assert slots(masked) == [[[1, 2], [3, 2]]]
  # Fewer real tokens than slots: the slot that would hold padding stays empty.
  short = routing.experts_choose(probs, capacity=2, token_mask=jnp.array([[0, 0, 0, 1]]))
  assert slots(short) == [[[3, EMPTY], [3, EMPTY]]]
  np.testing.assert_array_equal(short.kept_per_expert, [[1, 1]])


@pytest.mark.parametrize("k,batch_prioritized,renormalize,masked", [
    (1, False, False, False), (2, False, True, True), (2, True, False, False),
    (3, True, True, True)])
def test_tokens_choose_matches_naive_queues(k, batch_prioritized, renormalize, masked):
  rng = np.random.default_rng(k)
  probs = rng.dirichlet(np.ones(6), size=(3, 40))
  mask = rng.random((3, 40)) > 0.2 if masked else None
  capacity = 6
  out = routing.tokens_choose(jnp.array(probs, jnp.float32), k=k, capacity=capacity,
                              batch_prioritized=batch_prioritized, renormalize=renormalize,
                              token_mask=None if mask is None else jnp.array(mask))
  dispatch, combine = reference.tokens_choose(probs, k, capacity, batch_prioritized,
                                              renormalize, mask)
  assert dispatch.sum() < k * (mask.sum() if masked else 120)  # the case drops choices
  np.testing.assert_array_equal(out.dispatch_mask(), dispatch)
  np.testing.assert_allclose(out.combine_tensor(), combine, rtol=1e-5, atol=1e-7)
  # Per token: the top-k it asked for (dropped or not) and the experts that kept it.
  top_k = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  asked = (top_k[..., None] == np.arange(6)).any(axis=-2) & (True if mask is None else
                                                             mask[..., None])
  selected, processed = out.token_experts()
  np.testing.assert_array_equal(selected, asked)
  np.testing.assert_array_equal(processed, dispatch.any(axis=-1))


def test_random_second_expert_policy_keeps_with_probability_2_g2():
  # g2 / (g1 + g2) = .3 / .9, so the 2nd choice is kept with probability 2/3;
  # for [.45, .45, .1] the share is 1/2 and it is always kept.
  num_tokens = 20000
  probs = jnp.tile(jnp.array([[.6, .3, .1], [.45, .45, .1]]), (1, num_tokens // 2, 1))
  out = routing.tokens_choose(probs, k=2, capacity=num_tokens, renormalize=True,
                              second_expert_policy="random", rng=jax.random.key(0))
  kept = np.asarray(out.dispatch_mask()).any(-1)  # [G,S,E]
  second_kept = kept[0, 0::2, 1].mean()
  assert abs(second_kept - 2 / 3) < 0.015
  assert kept[0, 1::2, 1].all() and kept[0, :, 0].all()
  again = routing.tokens_choose(probs, k=2, capacity=num_tokens, renormalize=True,
                                second_expert_policy="random", rng=jax.random.key(0))
  np.testing.assert_array_equal(out.slot_token, again.slot_token)
  # Counted as requested before the policy, so they show up as dropped choices.
  np.testing.assert_array_equal(out.tokens_per_expert, [[num_tokens, num_tokens, 0]])


def test_load_balancing_loss_values():
  probs = jnp.array([[.5, .4, .1], [.3, .3, .4], [.1, .2, .7], [.8, .2, 0]])
  top1 = jax.nn.one_hot(jnp.argmax(probs, -1), 3)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, top1), 1.0875, rtol=1e-6)
  uniform = jnp.full((2, 8, 4), .25)
  top2 = jnp.tile(jnp.array([1., 1., 0., 0.]), (2, 8, 1))
  top2 = top2.at[:, 4:].set(jnp.array([0., 0., 1., 1.]))  # every expert in half the top-2 sets
  np.testing.assert_allclose(routing.load_balancing_loss(uniform, top2), 2.0, rtol=1e-6)


def test_router_z_loss_and_importance_loss():
  np.testing.assert_allclose(routing.router_z_loss(jnp.zeros((1, 2, 4))), np.log(4) ** 2,
                             rtol=1e-6)
  logits = jnp.array([[0., 0.], [np.log(3.), 0.]])  # logsumexp = ln 2, ln 4
  np.testing.assert_allclose(routing.router_z_loss(logits),
                             (np.log(2) ** 2 + np.log(4) ** 2) / 2, rtol=1e-6)
  np.testing.assert_allclose(routing.router_z_loss(logits, jnp.array([1, 0])), np.log(2) ** 2,
                             rtol=1e-6)
  # Importance [1.5, .5]: mean 1, variance .25 -> CV^2 = .25
  np.testing.assert_allclose(routing.importance_loss(jnp.array([[.5, .5], [1., 0.]])), .25,
                             rtol=1e-6)
  assert float(routing.importance_loss(jnp.full((5, 4), .25))) == 0.0


def test_routing_math_is_float32():
  probs = jnp.array([[[.9, .1], [.2, .8]]], jnp.bfloat16)
  out = routing.tokens_choose(probs, k=1, capacity=1)
  assert out.combine_tensor().dtype == jnp.float32 and out.probs.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=3), r"^k=3 must be in \[1, num_experts=2\]$"),
    (dict(k=1, second_expert_policy="sometimes"),
     r"^second_expert_policy='sometimes' is unknown; allowed: 'all', 'random'$"),
    (dict(k=2, second_expert_policy="random"),
     r"^second_expert_policy='random' needs k=2 and an rng, got k=2, rng=None$"),
])
def test_tokens_choose_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    routing.tokens_choose(jnp.full((1, 4, 2), .5), capacity=2, **kwargs)


def test_experts_choose_capacity_error():
  with pytest.raises(ValueError, match=r"^capacity=5 must be in \[1, group_size=4\] "):
    routing.experts_choose(jnp.full((1, 4, 2), .5), capacity=5)


def test_loss_free_bias_update_by_hand():
  # load [4, 1, 2, 1]: mean 2, sign(mean - load) = [-1, 1, 0, 1]
  bias = routing.loss_free_bias_update(jnp.array([0., .5, -.5, 0.]), jnp.array([4., 1., 2., 1.]),
                                       rate=0.1)
  np.testing.assert_allclose(bias, [-.1, .6, -.5, .1], rtol=1e-6)
  assert bias.dtype == jnp.float32


def test_selection_bias_picks_experts_but_not_gates():
  probs = jnp.array([[[.5, .3, .2], [.1, .6, .3], [.4, .25, .35]]])
  unbiased = routing.tokens_choose(probs, k=1, capacity=3)
  assert slots(unbiased) == [[[0, 2, EMPTY], [1, EMPTY, EMPTY], [EMPTY] * 3]]
  # +.25 on e2: token 2 moves there (.35 + .25 > .4); tokens 0 (.45 < .5) and 1 (.55 < .6) stay.
  biased = routing.tokens_choose(probs, k=1, capacity=3,
                                 selection_bias=jnp.array([0., 0., .25]))
  assert slots(biased) == [[[0, EMPTY, EMPTY], [1, EMPTY, EMPTY], [2, EMPTY, EMPTY]]]
  np.testing.assert_allclose(biased.slot_gate[0, :, 0], [.5, .6, .35], rtol=1e-6)  # unbiased p
  np.testing.assert_array_equal(biased.tokens_per_expert, [[1, 1, 1]])


def test_selection_bias_is_not_differentiated():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 6, 4)))
  gates = lambda probs, bias: routing.tokens_choose(
      probs, k=2, capacity=6, renormalize=True, selection_bias=bias).slot_gate.sum()
  grad_probs, grad_bias = jax.grad(gates, argnums=(0, 1))(probs, jnp.array([0., .2, 0., -.1]))
  np.testing.assert_array_equal(grad_bias, np.zeros(4))
  assert np.abs(grad_probs).max() > 0


def experts_of(table):
  """[1,S,E] bool -> each token's expert ids, for readable comparisons."""
  return [np.flatnonzero(row).tolist() for row in np.asarray(table)[0]]


def test_token_experts_by_hand():
  probs = jnp.array([[[.6, .3, .1], [.5, .4, .1], [.2, .3, .5]]])
  # k = 2, C = 1, k-major: t0 takes e0, t1's e0 is full, t2 takes e2; then t0 takes e1 and the
  # later 2nd choices find it full.
  out = routing.tokens_choose(probs, k=2, capacity=1)
  selected, processed = out.token_experts()
  assert experts_of(selected) == [[0, 1], [0, 1], [1, 2]]
  assert experts_of(processed) == [[0, 1], [], [2]]
  dropless = routing.tokens_choose(probs, k=2, capacity=None).token_experts()
  assert experts_of(dropless[0]) == experts_of(dropless[1]) == [[0, 1], [0, 1], [1, 2]]
  padded = routing.tokens_choose(probs, k=2, capacity=1, token_mask=jnp.array([[1, 0, 1]]))
  assert [experts_of(t) for t in padded.token_experts()] == [[[0, 1], [], [1, 2]],
                                                             [[0, 1], [], [2]]]
  # Loss-free: the bias picks, so t0 selects e2 and e1 (.1 + .45 > .3 + .2 > .6 - 0).
  biased = routing.tokens_choose(probs, k=2, capacity=3, selection_bias=jnp.array([-.5, .2, .45]))
  assert experts_of(biased.token_experts()[0]) == [[1, 2], [1, 2], [1, 2]]
  # Expert choice (C = 2): e0 takes t0, t1; e1 takes t1, t2; e2 takes t2, t1.
  probs = jnp.array([[[.6, .3, .1], [.5, .38, .12], [.2, .35, .45]]])
  chosen = routing.experts_choose(probs, capacity=2).token_experts()
  assert experts_of(chosen[0]) == experts_of(chosen[1]) == [[0], [0, 1, 2], [1, 2]]


def test_soft_token_experts_are_the_largest_combine_share_and_every_expert():
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  router = routers.SoftMoeRouter(num_experts=3)
  out, _ = router.init_with_output(jax.random.key(1), x, capacity=2, token_mask=mask)
  selected, processed = out.token_experts()
  shares = np.asarray(out.combine_weights).sum(axis=-1)[0]  # [S,E]: each expert's slots summed
  assert experts_of(selected) == [[int(np.argmax(shares[s]))] for s in range(5)] + [[]]
  assert experts_of(processed) == [[0, 1, 2]] * 5 + [[]]


def test_router_reports_its_largest_logit_over_real_tokens():
  """max_logit: what the z-loss bounds (ST-MoE), from x W over the real tokens only."""
  x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)  # [G,S,M]
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False
  router = routers.TopKRouter(num_experts=4, k=2)
  params = router.init(jax.random.key(0), x, capacity=4)
  kernel = np.asarray(params["params"]["logits"]["kernel"], np.float64)
  logits = x.astype(np.float64) @ kernel  # [G,S,E]
  x_padded = x.copy()
  x_padded[1, 4:] = 100.0  # padding with huge logits must not count
  routing = router.apply(params, x_padded, capacity=4, token_mask=mask, deterministic=True)
  assert float(routing.max_logit) == pytest.approx(logits[mask].max(), rel=1e-5)
  assert float(router.apply(params, x, capacity=4).max_logit) == pytest.approx(logits.max(),
                                                                                rel=1e-5)
