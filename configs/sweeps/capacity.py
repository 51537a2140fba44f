"""Switch Transformer Table 1 at small scale: top-1 (switch) vs top-2 (topk, k=2) routing at
capacity factors 1.0, 1.25 and 2.0 (the same factor at evaluation), on the fashion_mnist ViT.

  python -m experiments.sweep --sweep configs/sweeps/capacity.py --workdir runs/capacity

About 5 minutes on 2 CPU cores with --parallel 1 and tcmalloc preloaded as the Makefile does
(measured 2026-11-25: 4 min 54 s with --report, members 39-65 s; 6 members of 120 steps at batch
128; 6 min 16 s before that day's train-step speedup, 9 min 6 s with glibc's malloc). Result:
eval accuracy 0.71-0.72 for all six after 120 steps (within seed noise); top-1 trains at 32-38k
tokens/s against 22-32k for top-2, and the dropped fraction falls with the capacity factor
(top-1: 0.32, 0.22, 0.07; top-2: 0.22, 0.13, 0.03 at cf 1.0, 1.25, 2.0).
As in the paper, both routers have experts of the same width (the dense FFN's mlp_dim), so top-2
spends about twice the expert FLOPs of top-1 (see active_flops_per_token). Shows quality (eval
accuracy and loss) against throughput (tokens/s) and how many tokens each capacity drops: the
paper finds top-1 faster than top-2 and better for the time spent, and small capacity factors
(1.0-1.25) enough.
"""

CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def get_sweep():
  return {
      "base": "configs/vit.py",
      "fixed": {"model.moe.expert_hidden_dim": 512,  # equal experts, not equal active FLOPs
                "train.num_steps": 120, "train.warmup_steps": 12, "train.log_every": 10,
                "train.eval_every": 40, "train.checkpoint_every": 60},
      "grid": {"config_arg": ["switch", "topk"]},
      "members": [{"model.moe.capacity_factor": cf, "model.moe.eval_capacity_factor": cf}
                  for cf in CAPACITY_FACTORS],
  }
