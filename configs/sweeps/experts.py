"""Switch Transformer's scaling in the number of experts, at small scale: MoE beats the dense model
of equal active FLOPs, and the gain grows with the experts at fixed active FLOPs. The testbed of
configs/sweeps/moe_vs_dense.py (the byte-level LM, MoE in every layer, 400 steps) with top-2
routing over E = 4, 8, 16 and 32 experts of width mlp_dim / 2, paired over 3 seeds.

  python -m experiments.sweep --sweep configs/sweeps/experts.py --workdir runs/experts --report

Switch Transformer (Fedus et al. 2021, Figure 4) uses top-1; top-2 is this testbed's MoE. Result:
RESULTS.md, row a.
"""
from configs.sweeps import moe_vs_dense

NUM_EXPERTS = (4, 8, 16, 32)


def get_sweep():
  return {
      "base": "configs/lm.py",
      "fixed": moe_vs_dense.FIXED,
      "members": [{"config_arg": "dense"}] + [
          {"config_arg": "topk", "model.moe.num_experts": experts} for experts in NUM_EXPERTS],
      "seeds": [0, 1, 2],
      "baseline": "dense",
  }
