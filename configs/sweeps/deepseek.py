"""DeepSeekMoE at small scale: fine-grained and shared experts against top-2 at equal active FLOPs,
on the testbed of configs/sweeps/moe_vs_dense.py (the byte-level LM, MoE in every layer, 400
steps), paired over 3 seeds. `deepseek` (configs/common.py) splits the 16 top-2 experts 4 ways
(64 experts of width mlp_dim / 8) and keeps 2 of the 8 active ones always on.

  python -m experiments.sweep --sweep configs/sweeps/deepseek.py --workdir runs/deepseek --report

Dai et al. 2024 find fine-grained + shared experts better than GShard top-2 at equal active
parameters. Result: RESULTS.md, row f.
"""
from configs.sweeps import moe_vs_dense


def get_sweep():
  return {
      "base": "configs/lm.py",
      "fixed": moe_vs_dense.FIXED,
      "members": [{"config_arg": "topk"}, {"config_arg": "deepseek"}],
      "seeds": [0, 1, 2],
      "baseline": "topk",
  }
