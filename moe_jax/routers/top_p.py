"""Dynamic top-p routing (Huang et al. 2024, "Harder tasks need more experts")."""
from __future__ import annotations

from moe_jax.routers.base import register
from moe_jax.routers.top_k import TokensChooseRouter

__all__ = ["TopPRouter"]


@register("top_p")
class TopPRouter(TokensChooseRouter):
  """Each token takes experts in order of probability until their probabilities sum to p (at
  least one, at most k), gates the probabilities themselves (not renormalized), so a confident
  token uses one expert and a hard one several. The number varies per token: the routing
  statistic experts_per_token gives the realized mean, hence the active FLOPs; the configs size
  the experts for 2 per token, as top-2 (equal_flops_experts). Capacity is sized for k.

  Settings:
    p: the probability mass to reach (the paper: 0.4).
  """
  default_k = 4
  equal_flops_experts = 2.0
  p: float = 0.4

  def check(self, layer):
    super().check(layer)
    if not 0 < self.p <= 1:
      raise self.setting_error("p", "must be in (0, 1]")
    if self.renormalize:
      raise self.setting_error("renormalize", "does not apply: top_p gates are the "
                               "probabilities that reached p")

  def choose(self, probs, *, capacity, token_mask, bias=None, **policy):
    return super().choose(probs, capacity=capacity, token_mask=token_mask, bias=bias,
                          top_p=self.p, **policy)
