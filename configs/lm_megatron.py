"""Byte-level LM with Megatron-Core's top-k router at its defaults (megatron/core/transformer/moe:
router.py, moe_utils.py), top-2 of 16 experts at the dense LM's active FLOPs: the softmax after
the top-k (no --moe-router-pre-softmax: gates renormalized over the k), the load-balancing loss
per micro-batch divided by k at 1e-2 (--moe-aux-loss-coeff 1e-2; Megatron's default 0 turns
balancing off), no z-loss (--moe-z-loss-coeff unset). The config argument picks the capacity:

  dropless  Megatron's default (no --moe-expert-capacity-factor).
  position  --moe-expert-capacity-factor 1.25 --moe-token-drop-policy position: each expert keeps
            its first C = ceil(1.25 k S / E) askers in token order, in training and evaluation
            (topk.priority='token_major', min_capacity 1, eval_capacity_factor 1.25).

  python -m experiments.train --config configs/lm_megatron.py:position --workdir runs/lm_megatron

A group is one 128-byte sequence, as a Megatron micro-batch of one sequence per rank
(--micro-batch-size 1): Megatron's capacity, position order and per-micro-batch loss span its
micro-batch, whose tokens it orders position-major ([s, b]); a group of several sequences here
goes sequence by sequence. Megatron's default drop policy, probs (topk.drop_policy='probs',
drop_rank='gate'), keeps an expert's largest final gates, which reads later tokens: the causal LM
refuses it (the ViT takes it). tests/test_production_modes.py checks both policies against numpy
ports of topk_routing_with_score_function and apply_router_token_dropping. Not yet measured
against the other LM configs.
"""
from configs import common
from moe_jax.validation import allowed

CAPACITIES = ("dropless", "position")


def get_config(capacity="dropless"):
  if capacity not in CAPACITIES:
    raise ValueError(f"configs/lm_megatron.py:{capacity} is unknown; allowed: "
                     f"{allowed(CAPACITIES)}")
  config = common.lm("topk")
  moe = config.model.moe
  moe.topk.balance_per_k = True  # topk renormalizes by default
  config.train.update(aux_loss_weight=1e-2, z_loss_weight=0.0)
  if capacity == "dropless":
    moe.dispatch_path = "dropless"
  else:
    moe.capacity_factor = moe.eval_capacity_factor = 1.25
    moe.min_capacity = 1  # Megatron's capacity has no floor
    moe.topk.priority = "token_major"
  return config
