"""The routing modes of the production stacks against numpy ports of their formulas, written from
their definitions: Megatron-Core's topk_routing_with_score_function, group_limited_topk and
apply_router_token_dropping (megatron/core/transformer/moe/moe_utils.py, used by router.py's
TopKRouter), DeepSeek-V3's Gate (inference/model.py) and Hugging Face's Qwen3-MoE block; the
recipes configs/lm_megatron.py, lm_qwen3.py and lm_deepseek_v3.py route as those stacks and train.
Chosen experts and kept masks must be equal, gates equal to float32 rounding."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_deepseek_v3, lm_megatron, lm_qwen3
from moe_jax import config as config_lib
from moe_jax import routers, routing, train
from moe_jax.layers import MoeLayer
from moe_jax.models import common
from tests.test_train import read_jsonl, tiny, train_losses


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def torch_topk(values, k, axis=-1):
  """torch.topk: the k largest along `axis`, descending; ties to the lowest index (as torch's
  kernels take equal values)."""
  index = np.take(np.argsort(-values, axis=axis, kind="stable"), np.arange(k), axis=axis)
  return np.take_along_axis(values, index, axis=axis), index


# Megatron-Core (moe_utils.py).

def megatron_group_limited_topk(scores, topk, num_groups, group_topk):
  """group_limited_topk: groups ranked by the sum of their top topk // group_topk scores."""
  tokens, experts = scores.shape
  grouped = scores.reshape(tokens, num_groups, experts // num_groups)
  group_scores = torch_topk(grouped, topk // group_topk)[0].sum(-1)
  group_mask = np.zeros((tokens, num_groups), bool)
  np.put_along_axis(group_mask, torch_topk(group_scores, group_topk)[1], True, axis=1)
  score_mask = np.repeat(group_mask, experts // num_groups, axis=-1)
  return torch_topk(np.where(score_mask, scores, -np.inf), topk)


def megatron_topk_routing(logits, topk, *, use_pre_softmax=False, num_groups=None,
                          group_topk=None, scaling_factor=None, score_function="softmax",
                          expert_bias=None):
  """topk_routing_with_score_function -> (routing_probs [T,E], routing_map [T,E] bool)."""
  def compute_topk(scores):
    if group_topk:
      return megatron_group_limited_topk(scores, topk, num_groups, group_topk)
    return torch_topk(scores, topk)

  if score_function == "softmax":
    if use_pre_softmax:
      probs, top = compute_topk(softmax(logits))
    else:  # the top-k of the logits (groups too), then a softmax over the k
      values, top = compute_topk(logits)
      probs = softmax(values)
  else:
    scores = sigmoid(logits) if score_function == "sigmoid" else np.sqrt(np.logaddexp(0, logits))
    if expert_bias is not None:
      top = compute_topk(scores + expert_bias)[1]
      scores = np.take_along_axis(scores, top, axis=1)
    else:
      scores, top = compute_topk(scores)
    probs = scores / (scores.sum(-1, keepdims=True) + 1e-20) if topk > 1 else scores
  if scaling_factor:
    probs = probs * scaling_factor
  routing_probs, routing_map = np.zeros(logits.shape), np.zeros(logits.shape, bool)
  np.put_along_axis(routing_probs, top, probs, axis=1)
  np.put_along_axis(routing_map, top, True, axis=1)
  return routing_probs, routing_map


def megatron_capacity(num_tokens, num_experts, capacity_factor):
  """get_capacity without min_capacity (apply_router_token_dropping passes none)."""
  return math.ceil((num_tokens / num_experts) * capacity_factor)


def megatron_token_dropping(routing_probs, routing_map, router_topk, capacity_factor,
                            drop_policy):
  """apply_router_token_dropping (pad_to_capacity False) -> (final_probs, final_map)."""
  num_tokens, num_experts = routing_probs.shape
  capacity = megatron_capacity(num_tokens * router_topk, num_experts, capacity_factor)
  if capacity > num_tokens:
    capacity_mask = np.ones(routing_map.shape, bool)
  else:  # per expert, the top-capacity tokens of the final probs or of the 0/1 map
    ranked = routing_probs if drop_policy == "probs" else routing_map.astype(np.int32)
    capacity_mask = np.zeros(routing_map.shape, bool)
    np.put_along_axis(capacity_mask, torch_topk(ranked, capacity, axis=0)[1], True, axis=0)
  final_map = routing_map & capacity_mask
  return routing_probs * final_map, final_map


# DeepSeek-V3 (inference/model.py) and Hugging Face's Qwen3-MoE.

def deepseek_gate(logits, topk, n_groups, topk_groups, score_func, route_scale, bias=None,
                  normalize=True):
  """Gate.forward -> (weights [T,K], indices [T,K]). Groups ranked by their top-2 biased scores
  with a bias, by their largest score without (DeepSeek-V2's). normalize=False leaves out the
  division of the sigmoid weights (Hugging Face's norm_topk_prob=False)."""
  scores = softmax(logits) if score_func == "softmax" else sigmoid(logits)
  original = scores
  if bias is not None:
    scores = scores + bias
  if n_groups > 1:
    tokens, experts = scores.shape
    grouped = scores.reshape(tokens, n_groups, experts // n_groups)
    group_scores = grouped.max(-1) if bias is None else torch_topk(grouped, 2)[0].sum(-1)
    mask = np.ones((tokens, n_groups), bool)
    np.put_along_axis(mask, torch_topk(group_scores, topk_groups)[1], False, axis=1)
    scores = np.where(np.repeat(mask, experts // n_groups, axis=-1), -np.inf, scores)
  indices = torch_topk(scores, topk)[1]
  weights = np.take_along_axis(original, indices, axis=1)
  if score_func == "sigmoid" and normalize:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights * route_scale, indices


def qwen3_moe_routing(logits, top_k, norm_topk_prob=True):
  """Qwen3MoeSparseMoeBlock: softmax over all experts, top-k, renormalized by norm_topk_prob."""
  weights, indices = torch_topk(softmax(logits), top_k)
  if norm_topk_prob:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights, indices


def dense(weights, indices, num_experts):
  """[T,K] weights and indices -> ([T,E] weights, [T,E] bool map)."""
  probs = np.zeros((len(indices), num_experts))
  chosen = np.zeros((len(indices), num_experts), bool)
  np.put_along_axis(probs, indices, weights, axis=1)
  np.put_along_axis(chosen, indices, True, axis=1)
  return probs, chosen


# moe-jax's decision on the same logits.

def route(router, logits, *, k, capacity=None, bias=None, **settings):
  """One group of logits [T,E] -> the router's TokenChoices (its kernel the identity, so x W is
  the logits exactly); the settings checked by a MoeLayer first."""
  num_experts = logits.shape[-1]
  MoeLayer(num_experts=num_experts, expert_hidden_dim=4, router=router, k=k,
           router_settings=settings)
  variables = {"params": {"logits": {"kernel": jnp.eye(num_experts)}}}
  if bias is not None:
    variables["router_state"] = {"bias": jnp.asarray(bias, jnp.float32)}
  module = routers.get(router)(num_experts=num_experts, k=k, **settings)
  return module.apply(variables, jnp.asarray(logits, jnp.float32)[None], capacity=capacity,
                      deterministic=True)


def decision(out, num_experts):
  """TokenChoices of one group -> (kept gates [T,E], kept [T,E], selected [T,E] bool); the
  slot-major form must hold the same kept tokens and gates."""
  def scatter(experts, values):
    full = np.zeros((experts.shape[0], num_experts + 1), values.dtype)  # E: no expert
    np.put_along_axis(full, experts, values, axis=1)
    return full[:, :num_experts]
  experts = np.asarray(out.choice_expert[0])
  gates = scatter(experts, np.asarray(out.choice_gate[0], np.float64))
  kept = scatter(experts, np.ones(experts.shape, bool))
  selected = scatter(np.asarray(out.selected_expert[0]), np.ones(experts.shape, bool))
  if out.slot_token is not None:
    slot_token, slot_gate = np.asarray(out.slot_token[0]), np.asarray(out.slot_gate[0])
    for e in range(num_experts):
      filled = slot_token[e] < len(experts)
      assert sorted(slot_token[e][filled]) == list(np.flatnonzero(kept[:, e]))
      np.testing.assert_allclose(slot_gate[e][filled], gates[slot_token[e][filled], e],
                                 rtol=1e-6)
  return gates, kept, selected


def logits_of(seed, tokens, experts, scale=1.5, skew=0.0):
  """Gaussian logits, float32; skew > 0 adds a ramp over the experts so that some overflow."""
  rng = np.random.default_rng(seed)
  logits = scale * rng.standard_normal((tokens, experts)) + np.linspace(0, skew, experts)
  return logits.astype(np.float32)


BIAS = np.random.default_rng(0).uniform(-0.05, 0.05, 32).astype(np.float32)

# (Megatron-Core's flags, moe-jax's router and settings, k) on 32 experts.
MEGATRON_MODES = {
    "post_softmax": ({}, "topk", {}, 2),
    "pre_softmax": ({"use_pre_softmax": True}, "topk", {"renormalize": False}, 2),
    "post_softmax_groups": ({"num_groups": 4, "group_topk": 2}, "topk",
                            {"num_expert_groups": 4, "top_expert_groups": 2,
                             "group_score_input": "logits"}, 4),
    "pre_softmax_groups_scaled": (
        {"use_pre_softmax": True, "num_groups": 4, "group_topk": 2, "scaling_factor": 2.0},
        "topk", {"renormalize": False, "num_expert_groups": 4, "top_expert_groups": 2,
                 "scaling_factor": 2.0}, 4),
    "sigmoid_groups_scaled": (
        {"score_function": "sigmoid", "num_groups": 8, "group_topk": 4, "scaling_factor": 2.5},
        "topk", {"score_function": "sigmoid", "num_expert_groups": 8, "top_expert_groups": 4,
                 "scaling_factor": 2.5}, 8),
    "sigmoid_top1": ({"score_function": "sigmoid"}, "topk",
                     {"score_function": "sigmoid", "renormalize": False}, 1),
    "sqrtsoftplus": ({"score_function": "sqrtsoftplus"}, "topk",
                     {"score_function": "sqrtsoftplus"}, 3),
    "sigmoid_expert_bias_groups": (
        {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2, "scaling_factor": 2.5,
         "expert_bias": BIAS}, "loss_free",
        {"score_function": "sigmoid", "num_expert_groups": 4, "top_expert_groups": 2,
         "scaling_factor": 2.5}, 4),
    "sigmoid_expert_bias_top1": ({"score_function": "sigmoid", "expert_bias": BIAS}, "loss_free",
                                 {"score_function": "sigmoid", "renormalize_sigmoid": False}, 1),
}


@pytest.mark.parametrize("mode", MEGATRON_MODES)
def test_megatron_topk_routing_equals_numpy(mode):
  flags, router, settings, k = MEGATRON_MODES[mode]
  logits = logits_of(1, 64, 32)
  expected_probs, expected_map = megatron_topk_routing(logits.astype(np.float64), k, **flags)
  out = route(router, logits, k=k, bias=flags.get("expert_bias"), **settings)
  gates, kept, selected = decision(out, 32)
  np.testing.assert_array_equal(selected, expected_map)
  np.testing.assert_array_equal(kept, expected_map)
  np.testing.assert_allclose(gates, expected_probs, rtol=2e-6, atol=1e-7)


def test_megatron_post_softmax_groups_need_the_logits_option():
  # Groups ranked by the sum of their top-2 probabilities choose otherwise than by logits.
  flags, router, settings, k = MEGATRON_MODES["post_softmax_groups"]
  logits = logits_of(1, 64, 32)
  expected_map = megatron_topk_routing(logits.astype(np.float64), k, **flags)[1]
  on_scores = decision(route(router, logits, k=k, **{**settings, "group_score_input": "scores"}),
                       32)[1]
  assert (on_scores != expected_map).any(axis=1).sum() >= 5  # tokens routed differently


# (Megatron-Core's flags, its drop policy, moe-jax's router and settings, k) on 16 experts.
DROP_MODES = {
    "probs_post_softmax": ({}, "probs", "topk", {"drop_policy": "probs", "drop_rank": "gate"}, 2),
    "probs_sigmoid_groups_scaled": (
        {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2, "scaling_factor": 2.5},
        "probs", "topk", {"score_function": "sigmoid", "num_expert_groups": 4,
                          "top_expert_groups": 2, "scaling_factor": 2.5, "drop_policy": "probs",
                          "drop_rank": "gate"}, 4),
    "position_post_softmax": ({}, "position", "topk", {"priority": "token_major"}, 2),
    "position_expert_bias": ({"score_function": "sigmoid", "expert_bias": BIAS[:16]}, "position",
                             "loss_free", {"score_function": "sigmoid",
                                           "priority": "token_major"}, 3),
}


@pytest.mark.parametrize("mode", DROP_MODES)
def test_megatron_token_dropping_equals_numpy(mode):
  flags, drop_policy, router, settings, k = DROP_MODES[mode]
  logits = logits_of(2, 64, 16, skew=2.0)
  routing_probs, routing_map = megatron_topk_routing(logits.astype(np.float64), k, **flags)
  final_probs, final_map = megatron_token_dropping(routing_probs, routing_map, k, 1.0,
                                                   drop_policy)
  capacity = routing.expert_capacity(64, 16, k, 1.0, min_capacity=1)
  assert capacity == megatron_capacity(64 * k, 16, 1.0) < 64
  bias = flags.get("expert_bias")
  gates, kept, selected = decision(route(router, logits, k=k, capacity=capacity, bias=bias,
                                         **settings), 16)
  np.testing.assert_array_equal(selected, routing_map)
  assert 0 < final_map.sum() < routing_map.sum()  # some choices dropped
  np.testing.assert_array_equal(kept, final_map)
  np.testing.assert_allclose(gates, final_probs, rtol=2e-6, atol=1e-7)
  # moe-jax's defaults (rank by the score; k-major) keep other choices on these inputs
  default = {key: value for key, value in settings.items() if key not in ("drop_rank", "priority")}
  kept_default = decision(route(router, logits, k=k, capacity=capacity, bias=bias, **default),
                          16)[1]
  assert (kept_default != final_map).sum() >= 2


def test_token_major_priority_is_causal_and_k_major_is_not():
  # Top-2, 3 experts, 1 slot each. Token 0 asks experts 0, 1; token 1 asks 1, 2. k-major: token
  # 1's 1st choice (expert 1) takes the slot of token 0's 2nd; token-major: token 0 keeps it.
  probs = jnp.array([[[.5, .4, .1], [.1, .5, .4]]])
  k_major = routing.tokens_choose(probs, k=2, capacity=1)
  assert k_major.choice_expert.tolist() == [[[0, 3], [1, 2]]]  # 3 = E: dropped
  token_major = routing.tokens_choose(probs, k=2, capacity=1, priority="token_major")
  assert token_major.choice_expert.tolist() == [[[0, 1], [3, 2]]]
  assert token_major.slot_token.tolist() == [[[0], [0], [1]]]
  # On random groups, changing the last token changes no earlier token's kept choices under
  # token-major; under k-major it does.
  before = jnp.asarray(softmax(logits_of(3, 32, 8, skew=2.0)))[None]
  after = before.at[0, -1].set(before[0, -1, ::-1])
  kept = {priority: [np.asarray(routing.tokens_choose(p, k=2, capacity=6, priority=priority)
                                .choice_expert[0, :-1]) for p in (before, after)]
          for priority in routing.PRIORITIES}
  np.testing.assert_array_equal(*kept["token_major"])
  assert (kept["k_major"][0] != kept["k_major"][1]).any()


def test_token_major_with_batch_priority_keeps_each_experts_first_askers_by_top1_probability():
  probs = softmax(logits_of(8, 32, 8, skew=2.0))
  out = routing.tokens_choose(jnp.asarray(probs)[None], k=2, capacity=5, batch_prioritized=True,
                              priority="token_major")
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  order = np.argsort(-probs.max(-1), kind="stable")
  for e in range(8):
    askers = [s for s in order if e in top[s]]
    assert np.asarray(out.slot_token[0, e]).tolist() == (askers + [32] * 5)[:5]


def test_gate_ranking_by_hand():
  # Top-2 renormalized, two slots; all three tokens ask expert 0. Token 0: p = (.45, .45, .1),
  # score .45, gate .5; token 1: p = (.5, .1, .4), score .5, gate .5 / .9 = .556: first either
  # way. Token 2: p = (.48, .02, .5), score .48 before token 0's .45, gate .48 / .98 = .49 after
  # token 0's .5.
  probs = jnp.array([[[.45, .45, .1], [.5, .1, .4], [.48, .02, .5]]])
  for rank, expected in (("score", [1, 2]), ("gate", [1, 0])):
    out = routing.tokens_choose(probs, k=2, capacity=2, renormalize=True, drop_policy="probs",
                                drop_rank=rank)
    assert out.slot_token[0, 0].tolist() == expected


# (DeepSeek's Gate arguments, moe-jax's router and settings, k) on 32 experts.
DEEPSEEK_MODES = {
    # k = 6 of 8 groups, 2 chosen: the paper's k / M = 3 scores a group, the code its top 2.
    "v3": ({"n_groups": 8, "topk_groups": 2, "score_func": "sigmoid", "route_scale": 2.5,
            "bias": BIAS}, "loss_free",
           {"score_function": "sigmoid", "scaling_factor": 2.5, "num_expert_groups": 8,
            "top_expert_groups": 2, "group_score_experts": 2}, 6),
    "v3_not_normalized": ({"n_groups": 8, "topk_groups": 2, "score_func": "sigmoid",
                           "route_scale": 2.5, "bias": BIAS, "normalize": False}, "loss_free",
                          {"score_function": "sigmoid", "scaling_factor": 2.5,
                           "num_expert_groups": 8, "top_expert_groups": 2,
                           "group_score_experts": 2, "renormalize_sigmoid": False}, 6),
    "v2_softmax_max_group": ({"n_groups": 4, "topk_groups": 2, "score_func": "softmax",
                              "route_scale": 1.0}, "topk",
                             {"renormalize": False, "num_expert_groups": 4,
                              "top_expert_groups": 2, "group_score_experts": 1}, 6),
}


@pytest.mark.parametrize("mode", DEEPSEEK_MODES)
def test_deepseek_gate_equals_numpy(mode):
  gate_args, router, settings, k = DEEPSEEK_MODES[mode]
  logits = logits_of(4, 64, 32)
  weights, indices = deepseek_gate(logits.astype(np.float64), k, **gate_args)
  expected_gates, expected_map = dense(weights, indices, 32)
  gates, kept, _ = decision(route(router, logits, k=k, bias=gate_args.get("bias"), **settings),
                            32)
  np.testing.assert_array_equal(kept, expected_map)
  np.testing.assert_allclose(gates, expected_gates, rtol=2e-6, atol=1e-7)
  if gate_args.get("normalize", True) and "bias" in gate_args:
    np.testing.assert_allclose(gates.sum(-1), 2.5, rtol=1e-6)  # shares of the k, times 2.5
  elif "bias" in gate_args:  # the 6 sigmoid scores themselves, times 2.5
    assert (gates.sum(-1) > 2.5 + 1e-3).all()
  # the default group score (top k / top_expert_groups = 3) chooses otherwise
  default = {key: value for key, value in settings.items() if key != "group_score_experts"}
  kept_default = decision(route(router, logits, k=k, bias=gate_args.get("bias"), **default),
                          32)[1]
  assert (kept_default != expected_map).any(axis=1).sum() >= 3


def recipe_router(config):
  """A recipe config's router, k, E and training capacity for one group (None: dropless)."""
  moe = config.model.moe
  fields = common.fine_grained(moe, moe.num_experts)
  settings = moe[moe.router].to_dict()
  layer = MoeLayer(**fields, router=moe.router, router_settings=settings, causal=True,
                   capacity_factor=moe.capacity_factor, min_capacity=moe.min_capacity,
                   eval_capacity_factor=moe.eval_capacity_factor,
                   dispatch_path=moe.dispatch_path)
  capacity = None
  if moe.dispatch_path != "dropless":
    capacity = layer.capacity(moe.group_size, deterministic=False)
    assert capacity == layer.capacity(moe.group_size, deterministic=True)  # as Megatron's
  return moe.router, settings, layer.num_selected, fields["num_experts"], capacity


def test_megatron_recipe_routes_as_megatron():
  for capacity_arg in lm_megatron.CAPACITIES:
    router, settings, k, experts, capacity = recipe_router(lm_megatron.get_config(capacity_arg))
    assert (k, experts) == (2, 16)
    logits = logits_of(5, 128, experts, skew=2.0)  # one group: a 128-byte sequence
    expected_probs, expected_map = megatron_topk_routing(logits.astype(np.float64), k)
    if capacity is not None:
      assert capacity == megatron_capacity(128 * k, experts, 1.25)
      expected_probs, expected_map = megatron_token_dropping(expected_probs, expected_map, k,
                                                             1.25, "position")
      assert expected_map.sum() < 256
    gates, kept, _ = decision(route(router, logits, k=k, capacity=capacity, **settings), experts)
    np.testing.assert_array_equal(kept, expected_map)
    np.testing.assert_allclose(gates, expected_probs, rtol=2e-6, atol=1e-7)


def test_qwen3_recipe_routes_as_qwen3_moe():
  router, settings, k, experts, capacity = recipe_router(lm_qwen3.get_config())
  assert (k, experts, capacity) == (8, 64, None)
  logits = logits_of(6, 128, experts)
  expected_gates, expected_map = dense(*qwen3_moe_routing(logits.astype(np.float64), k), experts)
  gates, kept, _ = decision(route(router, logits, k=k, **settings), experts)
  np.testing.assert_array_equal(kept, expected_map)
  np.testing.assert_allclose(gates, expected_gates, rtol=2e-6, atol=1e-7)


def test_deepseek_v3_recipe_routes_as_deepseek_v3():
  router, settings, k, experts, capacity = recipe_router(lm_deepseek_v3.get_config())
  assert (router, k, experts, capacity) == ("loss_free", 7, 64, None)
  logits = logits_of(7, 128, experts)
  bias = np.random.default_rng(7).uniform(-0.05, 0.05, experts).astype(np.float32)
  weights, indices = deepseek_gate(logits.astype(np.float64), k, 8, 4, "sigmoid", 2.5, bias)
  expected_gates, expected_map = dense(weights, indices, experts)
  gates, kept, _ = decision(route(router, logits, k=k, bias=bias, **settings), experts)
  np.testing.assert_array_equal(kept, expected_map)
  np.testing.assert_allclose(gates, expected_gates, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("settings,message", [
    ({"drop_rank": "weight"}, "MoeLayer.topk.drop_rank='weight' is unknown; allowed: 'score', "
                              "'gate'"),
    ({"priority": "token"}, "MoeLayer.topk.priority='token' is unknown; allowed: 'k_major', "
                            "'token_major'"),
    ({"group_score_input": "probs"}, "MoeLayer.topk.group_score_input='probs' is unknown; "
                                     "allowed: 'scores', 'logits'"),
    ({"drop_rank": "gate"}, "MoeLayer.topk.drop_rank='gate' ranks the choices of "
                            "drop_policy='probs'"),
    ({"drop_policy": "probs", "priority": "token_major"},
     "MoeLayer.topk.priority='token_major' orders the choices of drop_policy='position'"),
    ({"score_function": "sigmoid", "group_score_input": "logits"},
     "MoeLayer.topk.group_score_input='logits' needs score_function='softmax' \\(the groups are "
     "ranked by log-probabilities\\)"),
    ({"num_expert_groups": 2, "top_expert_groups": 1, "group_score_experts": 5},
     "MoeLayer.topk.group_score_experts=5 must be in \\[0, num_experts / num_expert_groups = "
     "4\\]"),
    ({"num_expert_groups": 2, "top_expert_groups": 3, "group_score_experts": 2},
     "MoeLayer.topk.top_expert_groups=3 must be in \\[1, num_expert_groups=2\\]"),
])
def test_settings_are_checked_in_one_line(settings, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    MoeLayer(num_experts=8, expert_hidden_dim=4, router="topk", router_settings=settings)


@pytest.mark.parametrize("settings,message", [
    ({"group_score_input": "logits"}, "MoeLayer.loss_free.group_score_input='logits' must be "
     "'scores' for router='loss_free' \\(its groups are ranked by the scores plus the bias\\)"),
    ({"renormalize_sigmoid": False}, "MoeLayer.loss_free.renormalize_sigmoid=False applies to "
     "sigmoid and sqrtsoftplus scores, with renormalize=False"),
])
def test_loss_free_settings_are_checked_in_one_line(settings, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    MoeLayer(num_experts=8, expert_hidden_dim=4, router="loss_free", router_settings=settings)


def test_a_bad_option_in_a_config_names_the_field():
  config = config_lib.load_config(["--config=configs/lm_megatron.py:position",
                                   "--config.model.moe.topk.priority=tokens"])
  with pytest.raises(config_lib.ConfigError, match="^config.model.moe.topk.priority='tokens' is "
                                                  "unknown; allowed: 'k_major', 'token_major'$"):
    config_lib.validate(config, config.data.seq_len)
  with pytest.raises(config_lib.ConfigError, match="^configs/lm_megatron.py:probs is unknown; "
                                                  "allowed: 'dropless', 'position'$"):
    config_lib.load_config(["--config=configs/lm_megatron.py:probs"])


@pytest.mark.parametrize("config_arg", ["lm_qwen3.py", "lm_megatron.py",
                                        "lm_megatron.py:position", "lm_deepseek_v3.py"])
def test_recipes_train(tmp_path, config_arg):
  config = tiny(config_lib.load_config([f"--config=configs/{config_arg}"]), steps=6)
  config.data.seq_len = config.model.moe.group_size = 64
  config.train.update(batch_size=8, log_every=3, eval_max_batches=1, checkpoint_every=6)
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert len(losses) == 2 and np.isfinite(losses).all() and losses[-1] < losses[0]
  record = read_jsonl(tmp_path / "metrics.jsonl")[-2]
  dropped = record["train/routing/block_1/moe/dropped_fraction"]
  assert (dropped > 0) == (config.model.moe.dispatch_path != "dropless")
  assert np.isfinite(final["eval"]["eval/bits_per_byte"])
