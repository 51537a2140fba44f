"""A GPU-sized byte-level LM: about 100M parameters dense, in bfloat16, MoE in every layer.

  python -m experiments.train --config configs/lm_gpu.py:topk --workdir runs/lm_gpu_topk
  python benchmarks/gpu.py --out gpu.json        # its train step, dense and topk (BENCHMARKS.md)

configs/lm.py's model (RoPE, RMSNorm, 16 experts in every layer) at GPT-2-small widths: 14 layers
of width 768 (12 heads of 64), FFN 3072, 1024-byte windows, 32 per batch (32768 tokens). Dense:
99M parameters; every router keeps the dense model's active FLOPs (common.with_router: top-2
experts of width 1536), so the topk model holds about 560M. The training settings are not tuned.
The argument is a router of configs/lm.py (default 'topk').
"""
from configs import common


def get_config(router="topk"):
  config = common.lm("dense")
  config.data.seq_len = 1024
  model = config.model
  model.num_layers, model.width, model.num_heads, model.mlp_dim = 14, 768, 12, 3072
  model.dtype = "bfloat16"
  model.moe.group_size = 1024  # one sequence per group
  config.train.batch_size = 32
  config.train.learning_rate = 6e-4
  return common.with_router(config, router)
