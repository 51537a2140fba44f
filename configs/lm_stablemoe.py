"""Byte-level LM on the Python stdlib sources with router 'stablemoe' (StableMoE, Dai et al. 2022:
top-1 gated by sigmoid(x w_e); for the first tenth of the steps the learned router routes,
balanced by the paper's balance loss, while a distilled router (an embedding of the input byte,
dimension 50) learns its choices; then the frozen distilled router routes, so each byte keeps
one expert; causal-safe), its experts sized for 1 per token, aux_loss_weight 1 so that the
router's own coefficients weigh its losses (common.py).

  python -m experiments.train --config configs/lm_stablemoe.py --workdir runs/lm_stablemoe

Not yet measured.
"""
from configs import common


def get_config():
  c = common.lm("stablemoe")
  c.model.moe.stablemoe.distill_steps = c.train.num_steps // 10
  return c
