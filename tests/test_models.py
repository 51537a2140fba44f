"""Models: shapes, parameter and FLOP counts, MoE placement, causality, RoPE, config errors."""
import glob
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax.models import MODELS, common, flop_counts, get_model

MUTABLE = ["losses", "routing_stats"]
VIT_INFO = {"image_shape": (8, 8, 1), "num_classes": 10}
LM_INFO = {"vocab_size": 32, "seq_len": 8}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = {"vit": VIT_INFO, "lm": LM_INFO}


def make_config(name, moe=None, **fields):
  """A tiny model config (the field names of configs/), with overrides; moe: model.moe fields."""
  config = dict(name=name, num_layers=4, width=16, num_heads=2, mlp_dim=32, activation="gelu",
                dropout=0.0, dtype="float32", patch_size=4, pooling="cls", norm="rmsnorm",
                positions="rope",
                moe=dict(router="switch", num_experts=4, every=2, layers=(),
                         expert_hidden_dim=8, min_capacity=1))
  config.update(fields)
  config["moe"].update(moe or {})
  return ml_collections.ConfigDict(config)


def example(name, batch=2):
  if name == "vit":
    return jax.random.uniform(jax.random.key(0), (batch, *VIT_INFO["image_shape"]))
  return jax.random.randint(jax.random.key(0), (batch, LM_INFO["seq_len"]), 0,
                            LM_INFO["vocab_size"])


def init(config, x, abstract=False):
  """(model, params); abstract: shapes only (jax.eval_shape, nothing compiles)."""
  model = get_model(config, INFO[config.name])
  init_fn = lambda x: nn.meta.unbox(
      model.init({"params": jax.random.key(1)}, x, deterministic=True)["params"])
  return model, (jax.eval_shape(init_fn, x) if abstract else init_fn(x))


def apply(model, params, x, deterministic=True, rngs=None):
  return model.apply({"params": params}, x, deterministic=deterministic,
                     rngs=rngs or {"routing": jax.random.key(2)}, mutable=MUTABLE)


def num_params(params):
  return sum(leaf.size for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_and_per_layer_moe_state(name):
  model, params = init(make_config(name), example(name))
  logits, state = apply(model, params, example(name))
  expected = (2, 10) if name == "vit" else (2, 8, 32)
  assert logits.shape == expected and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  for collection in MUTABLE:
    assert sorted(state[collection]) == ["block_1", "block_3"]
  assert set(state["losses"]["block_1"]["moe"]) == {"load_balance_loss", "seq_balance_loss",
                                                     "global_balance_loss", "z_loss"}
  assert state["routing_stats"]["block_3"]["moe"]["stats"][0]["expert_load"].shape == (4,)


def test_vit_mean_pooling_has_no_class_token():
  _, params = init(make_config("vit", pooling="mean"), example("vit"), abstract=True)
  assert "cls" not in params and params["pos_embedding"].shape == (1, 4, 16)
  _, params = init(make_config("vit", pooling="cls"), example("vit"), abstract=True)
  assert params["cls"].shape == (1, 1, 16) and params["pos_embedding"].shape == (1, 5, 16)


@pytest.mark.parametrize("name,fields,moe", [
    ("vit", {}, {"router": "dense"}),
    ("vit", {"pooling": "mean", "activation": "relu"}, {"router": "gshard"}),
    ("vit", {"activation": "swiglu"},
     {"router": "expert_choice", "num_experts": (2, 6), "num_shared_experts": 1}),
    ("lm", {"positions": "learned", "norm": "layernorm"}, {"router": "dense"}),
    ("lm", {"activation": "swiglu"},
     {"router": "topk", "k": 2, "num_experts": (3, 5), "num_shared_experts": 2}),
    ("vit", {}, {"router": "soft", "group_size": 10, "dispatch_path": "einsum"}),
    ("vit", {}, {"router": "base", "group_size": 8}),
    ("lm", {}, {"router": "hash"}),
    ("lm", {}, {"router": "random"}),
    ("lm", {}, {"router": "vmoe", "noise_std": 0.25}),
    ("vit", {}, {"router": "topk", "granularity": 2, "num_shared_experts": 1, "residual": True}),
    ("lm", {"activation": "swiglu"}, {"router": "loss_free", "granularity": 4}),
])
def test_total_params_match_the_initialized_model(name, fields, moe):
  config = make_config(name, moe, **fields)
  _, params = init(config, example(name), abstract=True)
  assert flop_counts(config, INFO[name])["total_params"] == num_params(params)


def test_flops_and_params_of_a_small_lm_by_hand():
  config = make_config("lm", num_layers=1, positions="learned", moe={"router": "dense"})
  m, t, h, v = 16, 8, 32, 32
  attention = 2 * 4 * m * m + 4 * t * m
  assert flop_counts(config, LM_INFO) == {
      "active_flops_per_token": attention + 2 * 2 * m * h,
      "total_params": v * m + t * m + 4 * m * m + 2 * m * h + 3 * m,  # 3 RMSNorm scales
      "active_params": v * m + t * m + 4 * m * m + 2 * m * h + 3 * m,
      "embedding_params": v * m + t * m,
      "head_flops_per_token": 2 * v * m,  # the tied head's logits
  }


@pytest.mark.parametrize("pooling,tokens", [("cls", 5), ("mean", 4)])
def test_head_flops_of_a_small_vit_by_hand(pooling, tokens):
  # 8x8x1 images in 4x4 patches: 4 patches of 16 pixels, width 16, 10 classes.
  config = make_config("vit", pooling=pooling, moe={"router": "dense"})
  per_image = 4 * 2 * 16 * 16 + 2 * 16 * 10  # patch embedding, classifier
  assert flop_counts(config, VIT_INFO)["head_flops_per_token"] == per_image / tokens


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("router,k", [("switch", 1), ("topk", 2), ("topk", 3)])
def test_dense_ffn_of_width_kh_costs_what_topk_experts_of_width_h_cost(name, activation,
                                                                        router, k):
  hidden, num_experts, moe_layers = 8, 4, 2  # every=2 of 4 layers
  dense = flop_counts(make_config(name, {"router": "dense"}, mlp_dim=k * hidden,
                                  activation=activation), INFO[name])
  sparse = flop_counts(make_config(name, {"router": router, "k": k if router == "topk" else None,
                                          "expert_hidden_dim": hidden,
                                          "num_experts": num_experts},
                                   mlp_dim=k * hidden, activation=activation), INFO[name])
  router_flops = moe_layers * 2 * 16 * num_experts
  assert sparse["active_flops_per_token"] == dense["active_flops_per_token"] + router_flops
  assert sparse["active_params"] == dense["active_params"] + router_flops // 2
  assert sparse["embedding_params"] == dense["embedding_params"]
  ffn_matrices = 3 if activation == "swiglu" else 2
  idle_experts = moe_layers * (num_experts - k) * ffn_matrices * 16 * hidden
  assert sparse["total_params"] == sparse["active_params"] + idle_experts


def test_expert_choice_counts_capacity_factor_experts_per_token():
  dense = flop_counts(make_config("vit", {"router": "dense"}, mlp_dim=16), VIT_INFO)
  sparse = flop_counts(make_config("vit", {"router": "expert_choice", "capacity_factor": 2.0,
                                           "expert_hidden_dim": 8}, mlp_dim=16), VIT_INFO)
  assert sparse["active_flops_per_token"] == dense["active_flops_per_token"] + 2 * 2 * 16 * 4


@pytest.mark.parametrize("name,router,extra_flops,extra_params", [
    ("lm", "hash", 0, 0), ("lm", "random", 0, 0),  # no router parameters
    ("vit", "base", 2 * 16 * 4, 16 * 4),
    # 8 tokens per group, cf 1: 2 slots per expert, 8 slots, 1 slot per token. Per token:
    # logits, dispatch and combine, 2 * 16 * 8 FLOPs each; slot embeddings [16,4,2] and scale.
    ("vit", "soft", 3 * 2 * 16 * 8, 16 * 8 + 1),
])
def test_top1_and_soft_routers_cost_a_dense_ffn_plus_their_router(name, router, extra_flops,
                                                                   extra_params):
  moe = {"router": router, "expert_hidden_dim": 16, "group_size": 8, "capacity_factor": 1.0,
         "dispatch_path": "einsum"}  # soft's only path; the same FLOP count for the others
  dense = flop_counts(make_config(name, {"router": "dense"}, mlp_dim=16), INFO[name])
  sparse = flop_counts(make_config(name, moe, mlp_dim=16), INFO[name])
  moe_layers = 2
  assert sparse["active_flops_per_token"] == (dense["active_flops_per_token"]
                                              + moe_layers * extra_flops)
  assert sparse["active_params"] == dense["active_params"] + moe_layers * extra_params


@pytest.mark.parametrize("name", MODELS)
def test_fine_grained_and_shared_experts_keep_the_dense_active_flops_by_hand(name):
  # E = 4, H = 8 at granularity 4: 16 experts of width 2; 6 routed + 2 shared = 8 x 2 = mlp_dim.
  m, moe_layers = 16, 2
  config = make_config(name, {"router": "topk", "granularity": 4, "k": 6,
                              "num_shared_experts": 2, "expert_hidden_dim": 8, "num_experts": 4},
                       mlp_dim=16)
  _, params = init(config, example(name), abstract=True)
  layer = params["block_1"]["moe"]
  assert layer["experts"]["wi"].shape == (16, m, 2)
  assert layer["shared_experts"]["wi"].shape == (m, 2 * 2)
  assert layer["router"]["logits"]["kernel"].shape == (m, 16)
  dense = flop_counts(make_config(name, {"router": "dense"}, mlp_dim=16), INFO[name])
  sparse = flop_counts(config, INFO[name])
  router = m * 16  # per MoE layer
  assert sparse["active_flops_per_token"] == (dense["active_flops_per_token"]
                                              + moe_layers * 2 * router)
  assert sparse["active_params"] == dense["active_params"] + moe_layers * router
  assert sparse["total_params"] == sparse["active_params"] + moe_layers * (16 - 6) * 2 * m * 2


def test_residual_moe_counts_its_mlp_and_coefficient_by_hand():
  # Switch experts of width 8 beside a dense MLP of width 8: active FFN width 16 = mlp_dim.
  m, moe_layers, experts = 16, 2, 4
  dense = flop_counts(make_config("vit", {"router": "dense"}, mlp_dim=16), VIT_INFO)
  residual = flop_counts(make_config("vit", {"router": "switch", "residual": True,
                                             "expert_hidden_dim": 8}, mlp_dim=16), VIT_INFO)
  extra_flops = 2 * (m * experts + 2 * m)  # router logits and the 2-way coefficient
  assert residual["active_flops_per_token"] == (dense["active_flops_per_token"]
                                                + moe_layers * extra_flops)
  assert residual["active_params"] == dense["active_params"] + moe_layers * (extra_flops // 2 + 2)
  assert residual["total_params"] == residual["active_params"] + moe_layers * 3 * 2 * m * 8


def moe_blocks(params):
  return sorted(int(block[len("block_"):]) for block in params
                if block.startswith("block_") and "moe" in params[block])


@pytest.mark.parametrize("moe,blocks", [
    ({"every": 2}, [1, 3]),
    ({"every": 1}, [0, 1, 2, 3]),
    ({"every": 3}, [2]),
    ({"every": 2, "layers": (0, 2)}, [0, 2]),
    ({"router": "dense"}, []),
])
def test_moe_placement(moe, blocks):
  _, params = init(make_config("lm", moe), example("lm"), abstract=True)
  assert moe_blocks(params) == blocks
  for i in set(range(4)) - set(blocks):
    assert params[f"block_{i}"]["mlp"]["mlp"]["wi"].shape == (16, 32)


@pytest.mark.parametrize("counts", [{"num_experts": (2, 6)},
                                    {"num_experts": 8, "experts_per_layer": (2, 6)}])
def test_per_layer_expert_counts_set_expert_weight_shapes(counts):
  config = make_config("vit", {**counts, "layers": (0, 3)}, activation="swiglu")
  _, params = init(config, example("vit"), abstract=True)
  for block, experts in [("block_0", 2), ("block_3", 6)]:
    moe = params[block]["moe"]
    assert moe["experts"]["wi_gate"].shape == (experts, 16, 8)
    assert moe["experts"]["wo"].shape == (experts, 8, 16)
    assert moe["router"]["logits"]["kernel"].shape == (16, experts)


@pytest.mark.parametrize("moe", [
    {"router": "dense"},
    {"group_size": 8},  # one sequence per group
    {"group_size": 16, "dispatch_path": "index"},  # groups span two sequences
    {"router": "hash"}, {"router": "random"},
    {"router": "vmoe", "k": 1, "noise_std": 0.25},
])
def test_lm_logits_do_not_depend_on_later_tokens(moe):
  # Few slots (C = 2 for 8 or 16 tokens over 4 experts, 3 for the whole batch of 24), so that
  # capacity drops happen.
  config = make_config("lm", {"capacity_factor": 0.5, "eval_capacity_factor": 0.5,
                              "group_size": 24, **moe}, num_layers=2, dropout=0.0)
  inputs = example("lm", batch=3)
  model, params = init(config, inputs)
  logits, state = apply(model, params, inputs)
  if moe.get("router") != "dense":
    assert state["routing_stats"]["block_1"]["moe"]["stats"][0]["dropped_fraction"] > 0
  for t in (1, 4, 7):
    changed = inputs.at[1, t].set((inputs[1, t] + 1) % LM_INFO["vocab_size"])
    new_logits, _ = apply(model, params, changed)
    np.testing.assert_array_equal(new_logits[0], logits[0])  # earlier sequence of the group
    np.testing.assert_array_equal(new_logits[1, :t], logits[1, :t])
    assert not np.allclose(new_logits[1, t], logits[1, t])


def test_moepp_blocks_carry_router_logits_past_dense_blocks_to_the_next_moe_layer():
  config = make_config("lm", {"router": "moepp", "layers": (0, 2, 3)})  # block 1 dense
  _, params = init(config, example("lm"), abstract=True)
  routers = {i: params[f"block_{i}"]["moe"]["router"] for i in (0, 2, 3)}
  assert "gating_residual" not in routers[0]  # the first MoE layer has no previous logits
  for i in (2, 3):  # E + Z = 4 FFN + 4 zero-computation experts
    assert routers[i]["gating_residual"]["kernel"].shape == (8, 8)


def padded(inputs, extra):
  """inputs with `extra` all-zero examples appended, as the loader pads a last batch, and the
  batch mask [B] (True = real)."""
  pad = jnp.zeros((extra, *inputs.shape[1:]), inputs.dtype)
  mask = jnp.arange(inputs.shape[0] + extra) < inputs.shape[0]
  return jnp.concatenate([inputs, pad]), mask


@pytest.mark.parametrize("name,router", [("vit", "topk"), ("vit", "expert_choice"),
                                         ("lm", "topk")])
def test_padding_examples_change_neither_real_logits_nor_moe_losses_nor_statistics(name, router):
  # Groups of 9 tokens (ViT 5 per image, LM 8 per sequence) mix real and padding tokens, and
  # capacity binds (eval cf 1: C = 5 for top-2, 3 for expert choice), so routed padding would
  # take slots from real tokens (measured: real logits moved by 0.12-0.57 without the mask).
  config = make_config(name, {"router": router, "group_size": 9, "eval_capacity_factor": 1.0})
  inputs = example(name, batch=3)
  model, params = init(config, inputs)
  if name == "vit":  # its head starts at zero, which would hide any change
    params["head"]["kernel"] = jax.random.normal(jax.random.key(3), params["head"]["kernel"].shape)
  logits, state = apply(model, params, inputs)
  inputs_padded, mask = padded(inputs, extra=2)
  logits_padded, state_padded = model.apply({"params": params}, inputs_padded, mask=mask,
                                            deterministic=True, mutable=MUTABLE)
  np.testing.assert_allclose(logits_padded[:3], logits, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state_padded, state)
  assert float(state["routing_stats"]["block_1"]["moe"]["stats"][0]["dropped_fraction"]) > 0 or (
      router == "expert_choice")


def test_loss_free_lm_is_causal_in_training_calls():
  # A token picks its own top-2 of s + b, and a training call's bias update (from the whole
  # batch) only routes the next call. Room for every choice, so no choice competes for a slot.
  config = make_config("lm", {"router": "loss_free", "capacity_factor": 8.0}, num_layers=2)
  inputs = example("lm", batch=3)
  model = get_model(config, LM_INFO)
  variables = nn.meta.unbox(model.init({"params": jax.random.key(1)}, inputs,
                                       deterministic=True))
  bias = {"block_1": {"moe": {"router": {"bias": jnp.array([.2, -.1, 0., .3])}}}}
  run = jax.jit(lambda x: model.apply({"params": variables["params"], "router_state": bias}, x,
                                      deterministic=False, rngs={"routing": jax.random.key(2)},
                                      mutable=MUTABLE + ["router_state"]))
  logits, state = run(inputs)
  assert not np.allclose(state["router_state"]["block_1"]["moe"]["router"]["bias"],
                         bias["block_1"]["moe"]["router"]["bias"])
  for t in (1, 4, 7):
    new_logits, _ = run(inputs.at[1, t].set((inputs[1, t] + 1) % LM_INFO["vocab_size"]))
    np.testing.assert_array_equal(new_logits[0], logits[0])
    np.testing.assert_array_equal(new_logits[1, :t], logits[1, :t])
    assert not np.allclose(new_logits[1, t], logits[1, t])


@pytest.mark.parametrize("moe", [{"router": "expert_choice"},
                                 {"router": "soft", "group_size": 8, "dispatch_path": "einsum"},
                                 {"router": "base", "group_size": 8},
                                 {"router": "topk", "batch_prioritized": True}])
def test_lm_refuses_routers_that_read_future_tokens(moe):
  with pytest.raises(ValueError, match="not allowed with causal=True|invalid in a causal"):
    get_model(make_config("lm", moe), LM_INFO)
  get_model(make_config("vit", moe), VIT_INFO)  # fine in an encoder


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 8))  # one vector each, [T=1, N=1, D]
  positions = jnp.arange(12)
  rq = common.rope(jnp.broadcast_to(q, (12, 1, 8)), positions)[:, 0]  # [T, D]
  rk = common.rope(jnp.broadcast_to(k, (12, 1, 8)), positions)[:, 0]
  scores = np.asarray(rq @ rk.T)  # [m, n] = rope(q, m) . rope(k, n)
  for offset in range(-5, 6):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-5, atol=1e-5)
  assert np.ptp(scores[0]) > 0.1  # ... and they do depend on it
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)
  np.testing.assert_array_equal(common.rope(q, jnp.zeros(1)), q)  # position 0: identity


def naive_attention(q, k, v, causal):
  """Per (example, head, query) loop: softmax over the keys allowed, then the weighted values."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, length, heads, dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    for n in range(heads):
      for t in range(length):
        keys = t + 1 if causal else length
        scores = k[b, :keys, n] @ q[b, t, n] / np.sqrt(dim)
        weights = np.exp(scores - scores.max())
        out[b, t, n] = weights @ v[b, :keys, n] / weights.sum()
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_a_per_query_loop_and_jax_forward_and_gradient(causal):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 6, 3, 4))  # [B,T,N,D] each
  np.testing.assert_allclose(common.attention(q, k, v, causal), naive_attention(q, k, v, causal),
                             rtol=1e-5, atol=1e-6)
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  ours = jax.grad(lambda *a: jnp.sum(common.attention(*a, causal) * cotangent), (0, 1, 2))
  theirs = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, is_causal=causal)
                                       * cotangent), (0, 1, 2))
  for ours_grad, their_grad in zip(ours(q, k, v), theirs(q, k, v)):
    np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-5, atol=1e-6)


def test_self_attention_is_the_projections_around_attention():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))  # [B,T,M]
  module = common.SelfAttention(num_heads=2, causal=True)
  params = module.init(jax.random.key(1), x)["params"]
  q, k, v = (jnp.einsum("btm,mnd->btnd", x, params[name]["kernel"])
             for name in ("query", "key", "value"))
  expected = jnp.einsum("btnd,ndm->btm", naive_attention(q, k, v, causal=True),
                        params["out"]["kernel"])
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_rope_rotates_half_split_pairs_by_hand_and_its_gradient_is_the_inverse_rotation():
  x = jnp.array([[[1.0, 2.0, 3.0, 4.0]]])  # [T=1, N=1, D=4]: pairs (1, 3) and (2, 4)
  position = jnp.array([2.0])
  # Angles 2 * 10000^(-i/2) for i = 0, 1: 2 and 0.02.
  a, b = 2.0, 0.02
  expected = [1 * np.cos(a) - 3 * np.sin(a), 2 * np.cos(b) - 4 * np.sin(b),
              3 * np.cos(a) + 1 * np.sin(a), 4 * np.cos(b) + 2 * np.sin(b)]
  np.testing.assert_allclose(common.rope(x, position)[0, 0], expected, rtol=1e-6)
  # d/dx sum(g * R x) = R^T g: the rotation by minus the angle.
  g = jnp.array([[[0.5, -1.0, 2.0, 0.25]]])
  grad = jax.grad(lambda x: jnp.sum(g * common.rope(x, position)))(x)[0, 0]
  expected = [0.5 * np.cos(a) + 2 * np.sin(a), -1 * np.cos(b) + 0.25 * np.sin(b),
              2 * np.cos(a) - 0.5 * np.sin(a), 0.25 * np.cos(b) + 1 * np.sin(b)]
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_lm_norm_is_selectable():
  x = example("lm")
  _, rms = init(make_config("lm", norm="rmsnorm"), x, abstract=True)
  _, layer = init(make_config("lm", norm="layernorm"), x, abstract=True)
  assert set(rms["block_0"]["attn_norm"]) == set(rms["final_norm"]) == {"scale"}
  assert set(layer["block_0"]["attn_norm"]) == set(layer["final_norm"]) == {"scale", "bias"}
  assert "pos_embedding" not in rms  # rope by default


@pytest.mark.parametrize("name,fields,moe,message", [
    ("mlp", {}, {}, "model.name='mlp' is unknown; allowed: 'vit', 'lm'"),
    ("lm", {"num_heads": 3}, {}, "model.num_heads=3 must divide model.width=16"),
    ("vit", {"patch_size": 3}, {}, "model.patch_size=3 must divide the image size 8x8"),
    ("lm", {}, {"num_experts": (4, 8, 8)},
     "model.moe.num_experts has 3 entries but there are 2 MoE layers (1, 3)"),
    ("lm", {}, {"experts_per_layer": (4,)},
     "model.moe.experts_per_layer has 1 entries but there are 2 MoE layers (1, 3)"),
    ("vit", {}, {"layers": (1, 4)},
     "model.moe.layers=(1, 4) has an index outside [0, 4) (model.num_layers=4)"),
    ("lm", {}, {"every": 0},
     "model.moe.every=0 must be >= 1 (or list the layers in model.moe.layers)"),
    ("lm", {}, {"every": 5}, "model.moe.every=5, layers=() and first_dense_layers=0 place no "
                             "MoE layer among model.num_layers=4; use model.moe.router='dense' "
                             "for none"),
    ("lm", {}, {"every": 1, "first_dense_layers": 4},
     "model.moe.every=1, layers=() and first_dense_layers=4 place no MoE layer among "
     "model.num_layers=4; use model.moe.router='dense' for none"),
    ("lm", {}, {"first_hash_layers": 3},
     "model.moe.first_hash_layers=3 must be in [0, 2] (the MoE layers), with "
     "model.moe.granularity=1"),
    ("vit", {}, {"router": "topk", "shared_expert_gate": True},
     "MoeLayer.shared_expert_gate gates the shared experts; num_shared_experts=0"),
    ("lm", {}, {"router": "top3"}, "model.moe.router='top3' is unknown; allowed: 'dense', "
                                   "'switch', 'gshard', 'topk', 'expert_choice', 'vmoe', 'soft', "
                                   "'hash', 'random', 'base', 'loss_free', 'cosine', "
                                   "'sbase', 'top_p', 'forced', 'remoe', 'dselect_k', 'moepp', "
                                   "'stablemoe', 'smear', 'domain'"),
    ("lm", {}, {"activation": "relu"}, "model.moe.activation is not a MoeLayer setting here"),
    ("vit", {}, {"granularity": 0}, "model.moe.granularity=0 must be >= 1"),
    ("vit", {}, {"granularity": 3}, "model.moe.granularity=3 must divide "
                                    "model.moe.expert_hidden_dim=8"),
    ("vit", {}, {"granularity": 2, "router": "expert_choice"},
     "model.moe.granularity=2 splits the experts of tokens-choose routers; "
     "router='expert_choice' chooses no k"),
    ("vit", {}, {"granularity": 2}, "MoeLayer.k=2: router='switch' always chooses 1 expert; "
                                    "use router='topk' for k=2"),
    ("lm", {"dtype": "float16"}, {}, "model.dtype='float16' is unknown; allowed: 'float32', "
                                     "'bfloat16'"),
    ("vit", {"pooling": "max"}, {}, "model.pooling='max' is unknown; allowed: 'cls', 'mean'"),
    ("lm", {"positions": "alibi"}, {},
     "model.positions='alibi' is unknown; allowed: 'rope', 'learned'"),
    ("lm", {"num_heads": 16}, {}, "model.positions='rope' rotates pairs of dimensions, so the "
                                  "head dim model.width / model.num_heads = 1 must be even"),
    ("lm", {}, {"router": "switch", "k": 2},
     "MoeLayer.k=2: router='switch' always chooses 1 expert; use router='topk' for k=2"),
])
def test_config_errors_are_one_line_and_name_the_field(name, fields, moe, message):
  config = make_config(name, moe, **fields)
  for function in (get_model, flop_counts):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
      function(config, INFO.get(name, LM_INFO))
    assert "\n" not in str(error.value)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = example("lm")
  model, params = init(make_config("lm", dtype="bfloat16"), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits, _ = apply(model, params, x)
  reference, _ = apply(get_model(make_config("lm"), LM_INFO), params, x)
  assert logits.dtype == jnp.float32
  assert 0 < np.max(np.abs(logits - reference)) < 0.1  # computed in bf16, close to float32


def test_dropout_draws_its_rng_only_when_active():
  x = example("lm")
  model, params = init(make_config("lm", dropout=0.0), x)
  apply(model, params, x, deterministic=False)  # no 'dropout' rng needed at rate 0
  model = get_model(make_config("lm", dropout=0.5), LM_INFO)
  outputs = [apply(model, params, x, deterministic=False,
                   rngs={"routing": jax.random.key(2), "dropout": jax.random.key(seed)})[0]
             for seed in (0, 1)]
  assert not np.allclose(outputs[0], outputs[1])
  np.testing.assert_array_equal(apply(model, params, x)[0], apply(model, params, x)[0])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "[lv]*_*.py"))))
def test_every_config_file_loads_validates_and_counts_its_flops(path):
  from moe_jax import config as config_lib
  from tests.conftest import registered_routers
  with registered_routers():  # configs/vit_temperature.py registers its router
    config = config_lib.load_config([f"--config={path}"])
    name = config.model.name
    config_lib.validate(config, 50 if name == "vit" else config.data.seq_len)
    info = dict(VIT_INFO) if name == "vit" else {**LM_INFO, "seq_len": config.data.seq_len}
    assert flop_counts(config.model, info)["active_flops_per_token"] > 0


def test_layer_patterns_place_dense_and_hash_layers_first():
  config = make_config("lm", {"router": "topk", "every": 1, "first_dense_layers": 1,
                              "first_hash_layers": 1})
  layers = common.moe_layers(config, causal=True, num_token_ids=32)
  assert sorted(layers) == [1, 2, 3]  # layer 0 dense
  built = {index: make() for index, make in layers.items()}
  assert [built[i].router for i in (1, 2, 3)] == ["hash", "topk", "topk"]
  assert built[1].num_selected == 1 and built[2].num_selected == 2
  model, params = init(config, example("lm"))
  assert "mlp" in params["block_0"] and "router" not in params["block_1"]["moe"]
  assert "logits" in params["block_2"]["moe"]["router"]
