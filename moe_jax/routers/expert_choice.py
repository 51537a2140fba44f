"""Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group."""
from __future__ import annotations

from moe_jax.routers.base import Router, register
from moe_jax.routing import experts_choose

__all__ = ["ExpertChoiceRouter"]


@register("expert_choice")
class ExpertChoiceRouter(Router):
  """Expert choice: C = S cf / E slots per expert, so cf is the mean number of experts per token
  (the paper's capacity factor c = 2). Reads every token of the group: not causal."""
  default_k = None
  form = "slots"
  causal_safe = False

  @classmethod
  def paper_config(cls, num_experts):
    del num_experts
    return {"model.moe.capacity_factor": 2.0, "model.moe.eval_capacity_factor": 2.0}

  def cost(self, layer, model_dim):
    return super().cost(layer, model_dim)._replace(experts_per_token=layer.capacity_factor)

  def assign(self, probs, *, capacity, token_mask, deterministic):
    return experts_choose(probs, capacity=capacity, token_mask=token_mask)
