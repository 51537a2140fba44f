"""Byte-level LM on the Python stdlib sources with Mixture-of-Depths (Raposo et al. 2024;
models/mod.py): dense blocks, of which blocks 1 and 3 process only the top 12.5% of each
sequence's 128 bytes (16) in training. The top-k reads later tokens, so a predictor (an MLP of
width 64 on the stop-gradient of the block input, cross-entropy weight
train.mod_predictor_loss_weight) picks the tokens in evaluation: causal. Learned positions: the
chosen tokens attend among themselves, where RoPE would see their ranks.

  python -m experiments.train --config configs/lm_mod.py --workdir runs/lm_mod
"""
from configs import common


def get_config():
  return common.lm("mod")
