"""Byte-level LM with Qwen3-MoE's routing at small scale (Hugging Face's Qwen3MoeSparseMoeBlock;
the Qwen3 technical report), at the dense LM's active FLOPs per MoE layer: fine-grained experts
(granularity 4: 64 experts of width mlp_dim / 8 per layer), 8 of them per token and no shared
expert (Qwen3-30B-A3B: 8 of 128), softmax over every expert, the top-k gates renormalized
(norm_topk_prob=True), no capacity (dropless), and the global-batch load-balancing loss
(Qiu et al. 2025, 2501.11873) at router_aux_loss_coef 1e-3, not divided by k (Hugging Face's
load_balancing_loss_func sums the fractions of the k choices); no per-group loss, no z-loss.
Mixtral's routing is the same rule at k = 2 of 8 experts (router 'topk', dispatch_path
'dropless'). tests/test_production_modes.py checks the router against a numpy port of the
block's routing.

  python -m experiments.train --config configs/lm_qwen3.py --workdir runs/lm_qwen3

Megatron-Core: --num-experts 64 --moe-router-topk 8 (softmax after the top-k, its default)
--moe-router-load-balancing-type global_aux_loss --moe-aux-loss-coeff 1e-3 (Megatron divides by
k). What still differs (Hugging Face pools f and P over the layers into one loss, here each
layer has its own and they add up): docs/ROUTING.md, "Production stacks". Not yet measured
against the other LM configs.
"""
from configs import common


def get_config():
  config = common.lm("topk")
  moe = config.model.moe
  moe.granularity = 4  # 64 experts of width mlp_dim / 8, 4 x top-2's k = 8 chosen
  moe.dispatch_path = "dropless"  # topk renormalizes by default
  config.train.update(aux_loss_weight=0.0, global_aux_loss_weight=1e-3, z_loss_weight=0.0)
  return config
