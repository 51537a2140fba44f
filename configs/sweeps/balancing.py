"""Load balancing on the byte-level LM (causal), top-2 at equal active FLOPs, 2 seeds each:
  loss_free                     the loss-free bias (DeepSeek), no auxiliary loss
  topk                          the Switch load-balancing loss (train.aux_loss_weight 1e-2)
  topk,aux_loss_weight=0        no balancing at all
All three keep the router z-loss (1e-3), so only the balancing differs.

  python -m experiments.sweep --sweep configs/sweeps/balancing.py --workdir runs/balancing

About 2.5 minutes on 2 CPU cores with --parallel 1 and tcmalloc preloaded (measured 2026-11-26:
6 members of 120 steps at batch 32 x 128 bytes in 2 min 36 s, 24-28 s each). Compare eval loss
(bits per byte) with MaxVio (max_violation: max load / mean load - 1, averaged over MoE layers) and
the dropped fraction: Wang et al. 2024 find the bias both better balanced and lower in loss than
the aux loss. In 120 steps it is not: the bias moves by at most 120 x 1e-3, and the aux loss is
both best balanced and lowest (seeds 0 / 1: topk 3.37 / 3.36 bits per byte, MaxVio 0.24 / 0.17,
5.5% dropped; loss_free 3.40 / 3.39, MaxVio 0.46 / 0.49, 10-11% dropped; no balancing 3.41 / 3.39,
MaxVio 3.0 / 2.9, 61-68% dropped). Longer runs (train.num_steps) are what the comparison needs.
"""

BALANCING = ({"config_arg": "loss_free"}, {"config_arg": "topk"},
             {"config_arg": "topk", "train.aux_loss_weight": 0.0})


def get_sweep():
  return {
      "base": "configs/lm.py",  # its argument picks the router at equal active FLOPs
      "fixed": {"train.num_steps": 120, "train.warmup_steps": 12, "train.log_every": 10,
                "train.eval_every": 40, "train.checkpoint_every": 60},
      "members": list(BALANCING),
      "seeds": [0, 1],
      "baseline": "topk",
  }
