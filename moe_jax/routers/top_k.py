"""Tokens choose their top-k experts: Switch, GShard and Mixtral top-k."""
from __future__ import annotations

from moe_jax.routers.base import Router, register
from moe_jax.routing import SECOND_EXPERT_POLICIES, tokens_choose
from moe_jax.validation import check_choice

__all__ = ["GShardRouter", "SwitchRouter", "TokensChooseRouter", "TopKRouter"]


class TokensChooseRouter(Router):
  """Each token picks its top-k experts (see routing.tokens_choose).

  Settings:
    renormalize: divide the gates by the token's top-k probability sum (Mixtral, GShard).
  """
  default_k = 2
  prioritizes = True
  renormalize: bool = False

  def assign(self, probs, *, capacity, token_mask, deterministic):
    return tokens_choose(probs, k=self.k, capacity=capacity,
                         batch_prioritized=self.batch_prioritized, renormalize=self.renormalize,
                         token_mask=token_mask)


@register("switch")
class SwitchRouter(TokensChooseRouter):
  """Switch Transformer: top-1, output scaled by the router probability p_e."""
  default_k = 1
  fixed_k = True


@register("gshard")
class GShardRouter(TokensChooseRouter):
  """GShard top-2: gates renormalized by g1 + g2, 2nd expert kept with probability min(1, 2 g2).

  Settings:
    second_expert_policy: 'random' (the paper: keep the 2nd choice when 2 g2 / (g1 + g2) > u,
      u ~ U[0, 1)) or 'all'. In evaluation every 2nd choice is kept, so it needs no rng.
  """
  fixed_k = True
  renormalize: bool = True
  second_expert_policy: str = "random"

  def check(self, layer):
    super().check(layer)
    check_choice("MoeLayer.gshard", "second_expert_policy", self.second_expert_policy,
                 SECOND_EXPERT_POLICIES)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    policy = "all" if deterministic else self.second_expert_policy
    rng = self.make_rng("routing") if policy == "random" else None
    return tokens_choose(probs, k=self.k, capacity=capacity,
                         batch_prioritized=self.batch_prioritized, renormalize=self.renormalize,
                         second_expert_policy=policy, rng=rng, token_mask=token_mask)


@register("topk")
class TopKRouter(TokensChooseRouter):
  """Mixtral top-k: softmax over the top-k logits, i.e. renormalized top-k probabilities."""
  renormalize: bool = True
