"""V-MoE's noisy top-k (Riquelme et al. 2021) with its importance and load losses."""
from __future__ import annotations

import jax

from moe_jax.routers.base import register
from moe_jax.routers.top_k import TokensChooseRouter
from moe_jax.routing import importance_loss, load_loss

__all__ = ["VMoeRouter"]


@register("vmoe")
class VMoeRouter(TokensChooseRouter):
  """V-MoE noisy top-k (Riquelme et al. 2021): top-k of softmax(x W + eps), eps ~ N(0, sigma^2).

  Gates are the (not renormalized) probabilities of the noisy softmax. aux_loss = importance
  loss of the clean softmax (as vmoe) + load loss (see routing.importance_loss, load_loss); the
  paper weights each by 0.005 and sets sigma = 1 / E. Needs noise_std > 0: the load loss is a
  probability under that noise.
  """

  @classmethod
  def paper_config(cls, num_experts):
    return {"model.moe.noise_std": 1.0 / num_experts, "train.aux_loss_weight": 0.005}

  def check(self, layer):
    super().check(layer)
    if self.score_function != "softmax":
      raise self.setting_error("score_function", "must be 'softmax' for router='vmoe' (its "
                               "importance loss is of the softmax)")
    if self.noise_std <= 0:
      raise ValueError(f"MoeLayer.noise_std={self.noise_std} must be > 0 for router='vmoe' (its "
                       f"load loss is a probability under that noise; the paper: 1 / num_experts "
                       f"= {1 / self.num_experts:g})")

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    routing = super().route(logits, clean_logits=clean_logits, capacity=capacity,
                            token_mask=token_mask, deterministic=deterministic)
    balance = (importance_loss(jax.nn.softmax(clean_logits, axis=-1), token_mask)
               + load_loss(clean_logits, logits, k=self.k, noise_std=self.noise_std,
                           token_mask=token_mask))
    return routing.replace(aux_loss=balance)
