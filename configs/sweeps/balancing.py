"""Load balancing at small scale: top-2 on the testbed of configs/sweeps/moe_vs_dense.py (the
byte-level LM, 16 experts in every layer, 400 steps), paired over 3 seeds:
  topk                          the Switch load-balancing loss (train.aux_loss_weight 1e-2)
  loss_free                     the loss-free bias (Wang et al. 2024, DeepSeek-V3), no aux loss
  topk,aux_loss_weight=0        no balancing at all
All three keep the router z-loss (1e-3), so only the balancing differs.

  python -m experiments.sweep --sweep configs/sweeps/balancing.py --workdir runs/balancing --report

Compare eval bits per byte with MaxVio (max_violation: max load / mean load - 1, averaged over MoE
layers), the dropped fraction and the report's expert-load heatmaps: Switch finds that without
balancing the router collapses onto few experts; Wang et al. find the bias both better balanced
and lower in loss than the aux loss. The bias moves by u = 1e-3 a step, so 400 steps move it by
at most 0.4. Result: RESULTS.md, row c.
"""
from configs.sweeps import moe_vs_dense


def get_sweep():
  return {
      "base": "configs/lm.py",  # its argument picks the router at equal active FLOPs
      "fixed": moe_vs_dense.FIXED,
      "members": [{"config_arg": "topk"}, {"config_arg": "loss_free"},
                  {"config_arg": "topk", "train.aux_loss_weight": 0.0}],
      "seeds": [0, 1, 2],
      "baseline": "topk",
  }
