"""Switch Transformer Table 1 at small scale: top-1 (switch) vs top-2 (topk, k=2) routing at
capacity factors 1.0, 1.25 and 2.0 (the same factor at evaluation), on the fashion_mnist ViT,
paired over 3 seeds against top-1 at 1.25 (the paper's default).

  python -m experiments.sweep --sweep configs/sweeps/capacity.py --workdir runs/capacity --report

As in the paper, both routers have experts of the same width (the dense FFN's mlp_dim), so top-2
spends about twice the expert FLOPs of top-1 (see active_flops_per_token). Shows quality (eval
accuracy and loss) against throughput (tokens/s) and how many tokens each capacity drops: the
paper finds top-1 faster than top-2 and better for the time spent, and small capacity factors
(1.0-1.25) enough. 18 members of 120 steps at batch 128, about 40 s each on 2 cores with a
matmul peak of about 450 GFLOP/s. Result: RESULTS.md, row b.
"""

CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def get_sweep():
  return {
      "base": "configs/vit.py",
      "fixed": {"model.moe.expert_hidden_dim": 512,  # equal experts, not equal active FLOPs
                "train.num_steps": 120, "train.log_every": 10,
                "train.eval_every": 40, "train.checkpoint_every": 60},
      "grid": {"config_arg": ["switch", "topk"]},
      "members": [{"model.moe.capacity_factor": cf, "model.moe.eval_capacity_factor": cf}
                  for cf in CAPACITY_FACTORS],
      "seeds": [0, 1, 2],
      "baseline": "switch, capacity_factor=1.25, eval_capacity_factor=1.25",
  }
