"""ST-MoE's router z-loss at small scale: top-2 on the testbed of configs/sweeps/moe_vs_dense.py
(the byte-level LM, 16 experts in every layer, 400 steps) with the z-loss at 1e-3 (the paper's
and our default) and without it, paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/zloss.py --workdir runs/zloss --report

ST-MoE (Zoph et al. 2022) finds that the z-loss keeps router logits small (stability in bf16)
without hurting quality. Compare `max_logit` (the largest router logit in the last train record,
averaged over layers) and the eval bits per byte. Result: RESULTS.md, row d.
"""
from configs.sweeps import moe_vs_dense


def get_sweep():
  return {
      "base": "configs/lm.py",
      "fixed": moe_vs_dense.FIXED,
      "members": [{"config_arg": "topk"}, {"config_arg": "topk", "train.z_loss_weight": 0.0}],
      "seeds": [0, 1, 2],
      "baseline": "topk",
  }
