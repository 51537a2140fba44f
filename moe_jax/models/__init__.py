"""Models chosen by name (`model.name`), one file each: vit.py (image classifier), lm.py (decoder
LM).

  model = get_model(config.model, data_info)        # data_info: moe_jax.data.dataset_info
  params = model.init({'params': k0}, x, deterministic=True)['params']
  logits, state = model.apply({'params': params}, x, mask=mask, deterministic=False,
                              rngs={'dropout': k1, 'routing': k2},
                              mutable=['losses', 'routing_stats'])
x: vit 'image' float32 [B,H,W,C] -> logits [B,num_classes]; lm 'inputs' int32 [B,L] -> [B,L,V].
mask: optional bool [B], the batch's 'mask' (False: a padding example of a partial last batch):
its tokens are routed by no MoE layer and count in no routing loss or statistic.
domains (lm only): optional int32 [B], the batch's 'domain' labels, which router 'domain' reads.
Every MoeLayer sows under its block, e.g. state['losses']['block_1']['moe'] holds
'load_balance_loss' and 'z_loss', state['routing_stats']['block_1']['moe']['stats'] the stats.
Parameters are float32; blocks are 'block_<i>', with 'attn' and 'mlp' (dense) or 'moe'.

Config fields (ml_collections.ConfigDict, `config.model`):
  name               'vit' | 'lm'
  num_layers         blocks
  width              M
  num_heads          must divide width (lm with rope: width / num_heads even)
  mlp_dim            hidden width of the dense FFN layers
  activation         'gelu' | 'relu' | 'swiglu', for dense FFNs and experts
  dropout            rate on both residual branches of every block; 0 draws no 'dropout' rng
  dtype              compute dtype 'float32' | 'bfloat16'; params stay float32, routers float32
  patch_size         vit: must divide the image height and width
  pooling            vit: 'cls' (class token) | 'mean' (mean over patches, no class token)
  norm               lm: 'rmsnorm' | 'layernorm' (vit always uses layernorm)
  positions          lm: 'rope' | 'learned' (learned: data_info['seq_len'] positions)
  moe.router         'dense' (no MoE layer; other moe fields ignored) or a registered router
                     (routers.names(): 'switch' | 'gshard' | 'topk' | 'vmoe' | 'expert_choice' |
                     'soft' | 'hash' | 'random' | 'base' | 'loss_free'; expert_choice, soft,
                     base not in lm: not causal). The models pass token ids for 'hash' (lm:
                     input bytes; vit: token positions with the class token at 0), and the lm
                     each sequence's domain label for 'domain' (data with labels only).
  moe.router_module  a module to import first (dotted path), which registers a router of yours
  moe.<router name>  that router's own settings (e.g. moe.gshard.second_expert_policy), given
                     to MoeLayer as router_settings when it is the router
  moe.granularity    m: m x num_experts experts of width expert_hidden_dim / m, m x the router's
                     k chosen unless moe.k is set (DeepSeekMoE; common.fine_grained)
  moe.num_experts    int, or one count per MoE layer in increasing layer order (PR-MoE pyramid)
  moe.experts_per_layer  optional; when non-empty, the per-layer counts (overrides num_experts)
  moe.every          MoE in layers every-1, 2*every-1, ... (every=2: 1, 3, ...; 1: all)
  moe.layers         explicit 0-based MoE layer indices; overrides `every` when non-empty
  moe.<other>        passed to MoeLayer as is: expert_hidden_dim, k, capacity_factor,
                     eval_capacity_factor, min_capacity, group_size, dispatch_path,
                     num_shared_experts, residual, router_init_scale, jitter_eps, noise_std,
                     batch_prioritized (see layers.MoeLayer)
Configuration errors (these and MoeLayer's own) raise from layer_plan (and get_model, which
derives it when not given one), before anything compiles.

flop_counts: forward FLOPs per token (a multiply-add is 2 FLOPs) and parameter counts, from the
config alone. T = tokens per example (vit: patches + class token; lm: seq_len), M = width,
F = 2 FFN weight matrices (3 for swiglu). Per block:
  attention   2 * 4 M^2 (q, k, v, out projections) + 4 T M (scores q.k and the weighted sum of
              values, computed in full even when causal)
  dense FFN   2 F M mlp_dim
  MoE layer   2 (M E + k_eff F M H + s F M H + r (F M H + 2 M)): router, k_eff experts, s shared
              experts, r = 1 for a residual MLP and its 2-way coefficient (E, H, k after
              granularity); k_eff = k for tokens-choose routers (an upper bound: it
              ignores capacity drops and gshard's random second expert) and capacity_factor for
              expert_choice (its mean experts per token). Dispatch/combine are excluded, except
              for soft, where mixing tokens into slots is the method: its router costs
              3 * 2 M E C (slot logits, dispatch, combine; C slots per expert, k_eff = E C / S
              with the configured group_size S) and has M E C + 1 parameters. hash and random
              have no router (0 FLOPs, 0 parameters).
Embeddings, norms and the output head are not counted in active_flops_per_token, so top-k
experts of width H cost exactly what a dense FFN with mlp_dim = k H costs, plus the router's 2 M E.
  head_flops_per_token  the matmuls outside the blocks, per token (model FLOPs utilization
                    counts them, as PaLM's and Megatron's do): vit: the patch embedding
                    2 p^2 C M per patch and the classifier 2 M classes per image, over T (a
                    float); lm: the tied output head 2 V M (the token lookup is a gather)
  total_params      every parameter, as initialized (loss_free biases are state, not counted)
  active_params     total_params - sum over MoE layers of (E - k_eff) F M H: what one token
                    touches, embeddings included (a float for expert_choice)
  embedding_params  vit: patch kernel + bias, position embeddings, class token; lm: token
                    embedding (= tied output head) + learned positions
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn

from moe_jax.validation import check_choice
from moe_jax.models import common, lm, vit

_MODULES = {"vit": vit, "lm": lm}
MODELS = tuple(_MODULES)


def _module(model_config):
  check_choice("model", "name", model_config.name, MODELS)
  return _MODULES[model_config.name]


def layer_plan(model_config, data_info) -> common.LayerPlan:
  """Which blocks hold MoE layers and routed (Mixture-of-Depths) blocks, with each MoE layer's
  experts, widths, k, capacity and router: derived once, with every check of the model's
  fields (one-line ValueErrors naming the field), for get_model, flop_counts, sharding and the
  trace to share."""
  plan = _module(model_config).layer_plan(model_config, data_info)
  common.check_domain_labels(model_config, data_info)
  return plan


def get_model(model_config, data_info, plan: Optional[common.LayerPlan] = None) -> nn.Module:
  """The model named by model_config.name, for the dataset described by data_info; its layers
  from `plan` (layer_plan's, derived here when None)."""
  plan = layer_plan(model_config, data_info) if plan is None else plan
  return _module(model_config).from_config(model_config, data_info, plan)


def check_config(model_config, data_info) -> None:
  """The model's own field checks (one-line ValueErrors naming the field), without building it."""
  _module(model_config).check_config(model_config, data_info)
  common.check_domain_labels(model_config, data_info)


def flop_counts(model_config, data_info, plan: Optional[common.LayerPlan] = None) -> dict:
  """{'active_flops_per_token', 'head_flops_per_token', 'total_params', 'active_params',
  'embedding_params'}; of `plan`'s layers (layer_plan's, derived here when None)."""
  plan = layer_plan(model_config, data_info) if plan is None else plan
  return _module(model_config).flop_counts(model_config, data_info, plan)


__all__ = ["MODELS", "check_config", "flop_counts", "get_model", "layer_plan"]
