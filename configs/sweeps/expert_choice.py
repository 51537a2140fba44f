"""Expert choice against top-2 tokens-choose at equal compute (Zhou et al. 2022), at small scale:
the fashion_mnist ViT of configs/vit.py (400 steps; expert choice reads every token of a group,
so it cannot run in the causal LM), expert choice at capacity factor 2 (experts of width
mlp_dim / 2, as top-2's), paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/expert_choice.py --workdir runs/ec --report

Zhou et al. find expert choice better than top-2 gating at equal compute, with perfect balance
and no dropped experts' capacity. Result: RESULTS.md, row e.
"""


def get_sweep():
  return {
      "base": "configs/vit.py",
      "fixed": {"train.eval_every": 400, "train.checkpoint_every": 200},
      "members": [{"config_arg": "topk"}, {"config_arg": "expert_choice"}],
      "seeds": [0, 1, 2],
      "baseline": "topk",
  }
