"""ViT on fashion_mnist with router 'stablemoe' (StableMoE, Dai et al. 2022: top-1 gated by
sigmoid(x w_e); for the first tenth of the steps the learned router routes, balanced by the
paper's balance loss, while a distilled router (an embedding of the patch's position, the ViT's
token id as in hash routing; dimension 50) learns its choices; then the frozen distilled router
routes, so each position keeps one expert), its experts sized for 1 per token, aux_loss_weight 1
so that the router's own coefficients weigh its losses (common.py).

  python -m experiments.train --config configs/vit_stablemoe.py --workdir runs/vit_stablemoe

Not yet measured; a member of configs/sweeps/zoo.py (there at the router's default 40 steps of
stage 1, a third of the zoo's 120).
"""
from configs import common


def get_config():
  c = common.vit("stablemoe")
  c.model.moe.stablemoe.distill_steps = c.train.num_steps // 10
  return c
