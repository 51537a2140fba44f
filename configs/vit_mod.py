"""ViT on fashion_mnist with Mixture-of-Depths (Raposo et al. 2024; models/mod.py): dense blocks,
of which blocks 1 and 3 process only the top 12.5% of each image's 50 tokens (7, by a linear
router's score; the output scaled by that score), the rest skipping them. No MoE layers; fewer
active FLOPs than the dense ViT (the zoo reports them).

  python -m experiments.train --config configs/vit_mod.py --workdir runs/vit_mod

The ViT needs no predictor: evaluation takes the same top-k (bidirectional, nothing causal).
"""
from configs import common


def get_config():
  return common.vit("mod")
