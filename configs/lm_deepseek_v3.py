"""Byte-level LM with DeepSeek-V3's routing at small scale, at the dense LM's active FLOPs per
MoE layer: the first layer dense (DeepSeek-V3: the first 3 of 61), then fine-grained experts
(granularity 4: 64 experts of width mlp_dim / 8 per layer), 1 shared expert and 7 routed ones
per token (DeepSeek-V3: 1 shared + 8 of 256), sigmoid scores whose top-k gates are renormalized
and scaled by 2.5, auxiliary-loss-free balancing by a per-expert bias, and group-limited
routing: the 64 experts in 8 groups, a token's experts from its 4 best groups (DeepSeek-V3's
node-limited routing: 8 groups, 4 chosen), each group scored by the sum of its 2 largest biased
scores (DeepSeek-V3's code; its paper's K_r / M is 8 / 4 = 2 too). No capacity: DeepSeek-V3
drops no token in training. The sequence-wise balance loss at its alpha = 1e-4 (divided by k,
as its f_i = E / (K_r T)), no z-loss. tests/test_production_modes.py checks the router against a
numpy port of DeepSeek-V3's Gate (inference/model.py).

  python -m experiments.train --config configs/lm_deepseek_v3.py --workdir runs/lm_deepseek_v3

Megatron-Core: --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.5
--moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-enable-expert-bias
--moe-layer-freq "[0]+[1]*3" (Megatron scores a group by its top k / 4 = 1 here: the same
routing needs k = 8); maxtext: routed_score_func=sigmoid routed_scaling_factor=2.5
n_routing_groups=8 topk_routing_group=4 routed_bias=True first_num_dense_layers=1 (docs/CONFIG.md
names each flag). What still differs (the sequence-wise loss counts the routed choices, the paper a
plain top-k of the scores): docs/ROUTING.md, "Production stacks". Not yet measured against the
other LM configs.
"""
from configs import common


def get_config():
  config = common.lm("loss_free")
  moe = config.model.moe
  moe.first_dense_layers = 1
  moe.granularity, moe.num_shared_experts = 4, 1  # 64 experts of width mlp_dim / 8
  moe.k = 7  # + 1 shared = 8 x mlp_dim / 8: the dense FFN's active FLOPs
  moe.dispatch_path = "dropless"
  moe.loss_free.update(score_function="sigmoid", scaling_factor=2.5, num_expert_groups=8,
                       top_expert_groups=4, group_score_experts=2, balance_per_k=True)
  config.train.update(seq_aux_loss_weight=1e-4, z_loss_weight=0.0)
  return config
