"""Tokens choose their top-k experts: Switch, GShard and Mixtral top-k, with the top-k options of
the production stacks (score function, renormalization, routed scaling, group-limited routing,
per-k balancing, the drop order at capacity; docs/CONFIG.md names Megatron-Core's, maxtext's and
torchtitan's flags for them)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers.base import Router, register, replayed_choices
from moe_jax.routing import (DROP_POLICIES, DROP_RANKS, PRIORITIES, SECOND_EXPERT_POLICIES,
                             TokenChoices, group_limit_bias, tokens_choose)
from moe_jax.validation import check_choice

Array = jax.Array

__all__ = ["GROUP_SCORE_INPUTS", "GShardRouter", "SCORE_FUNCTIONS", "SwitchRouter",
           "TokensChooseRouter", "TopKRouter"]

# Scores of the logits: the probabilities top-k ranks (sigmoid: DeepSeek-V3; sqrtsoftplus:
# sqrt(softplus(x))). Only softmax scores sum to 1: the others are normalized for the balancing
# loss and the statistics.
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORE_INPUTS = ("scores", "logits")  # what group-limited routing sums per group


class TokensChooseRouter(Router):
  """Each token picks its top-k experts (see routing.tokens_choose).

  Settings:
    score_function: 'softmax' | 'sigmoid' | 'sqrtsoftplus', the scores s of the logits.
    renormalize: divide the gates by the token's top-k score sum (Mixtral, GShard; what softmax
      over the top-k logits gives).
    scaling_factor: multiplies the gates, after renormalizing (DeepSeek-V3: 2.5).
    num_expert_groups, top_expert_groups: group-limited routing (routing.group_limit_bias): the
      experts split into num_expert_groups groups, the top-k chosen inside the top_expert_groups
      groups; 1, 1 is off.
    group_score_experts: n, a group's score is the sum of its n largest selection scores; 0:
      k // top_expert_groups (DeepSeek-V3's paper, Megatron-Core); 2: DeepSeek-V3's code and
      Hugging Face's block; 1: the group's largest (DeepSeek-V2's code).
    group_score_input: 'scores' or 'logits' (softmax only: Megatron-Core's top-k after the
      softmax ranks the groups by their logits; log-probabilities rank them the same, the
      token's logsumexp shifting every group's sum by n times the same amount).
    balance_per_k: divide the load-balancing loss by k, so uniform routing gives 1 for every k
      (Megatron's normalization; without it uniform routing gives k).
    drop_policy: 'position' (priority order, then token order or batch priority) or 'probs'
      (each expert keeps its highest-ranked choices; reads later tokens, so not in a causal
      layer).
    drop_rank: what 'probs' ranks by: 'score' (the choice's score) or 'gate' (its gate,
      renormalized and scaled: Megatron-Core's --moe-token-drop-policy probs).
    priority: the order of 'position': 'k_major' (every 1st choice before any 2nd: GShard,
      Lepikhin et al. 2020; a later token's 1st choice can take an earlier token's 2nd choice's
      slot) or 'token_major' (each expert's askers in token order: Megatron-Core's
      --moe-token-drop-policy position; causal).
  """
  default_k = 2
  prioritizes = True
  replays = True
  score_function: str = "softmax"
  renormalize: bool = False
  scaling_factor: float = 1.0
  num_expert_groups: int = 1
  top_expert_groups: int = 1
  group_score_experts: int = 0
  group_score_input: str = "scores"
  balance_per_k: bool = False
  drop_policy: str = "position"
  drop_rank: str = "score"
  priority: str = "k_major"

  def check(self, layer):
    super().check(layer)
    name = f"MoeLayer.{self.router_name}"
    check_choice(name, "score_function", self.score_function, SCORE_FUNCTIONS)
    check_choice(name, "drop_policy", self.drop_policy, DROP_POLICIES)
    check_choice(name, "drop_rank", self.drop_rank, DROP_RANKS)
    check_choice(name, "priority", self.priority, PRIORITIES)
    check_choice(name, "group_score_input", self.group_score_input, GROUP_SCORE_INPUTS)
    if self.drop_policy == "probs" and (layer.causal or self.batch_prioritized):
      raise self.setting_error("drop_policy", "orders every choice of the group by its score: "
                               "not with causal=True or batch_prioritized")
    if self.drop_rank != "score" and self.drop_policy != "probs":
      raise self.setting_error("drop_rank", "ranks the choices of drop_policy='probs'")
    if self.priority != "k_major" and self.drop_policy != "position":
      raise self.setting_error("priority", "orders the choices of drop_policy='position'")
    if self.group_score_input == "logits" and self.score_function != "softmax":
      raise self.setting_error("group_score_input", "needs score_function='softmax' (the "
                               "groups are ranked by log-probabilities)")
    if self.scaling_factor <= 0:
      raise self.setting_error("scaling_factor", "must be > 0")
    groups, chosen = self.num_expert_groups, self.top_expert_groups
    if groups < 1 or self.num_experts % groups:
      raise self.setting_error("num_expert_groups", f"must divide num_experts="
                               f"{self.num_experts}")
    if not 0 <= self.group_score_experts <= self.num_experts // groups:
      raise self.setting_error("group_score_experts", f"must be in [0, num_experts / "
                               f"num_expert_groups = {self.num_experts // groups}]")
    if self.group_score_experts and not 1 <= chosen <= groups:
      raise self.setting_error("top_expert_groups", f"must be in [1, num_expert_groups="
                               f"{groups}]")
    if not self.group_score_experts and not 1 <= chosen <= min(groups, self.k):
      raise self.setting_error("top_expert_groups", f"must be in [1, min(num_expert_groups="
                               f"{groups}, k={self.k})] (each chosen group is scored by its "
                               "top k / top_expert_groups scores)")
    if self.k > chosen * (self.num_experts // groups):
      raise ValueError(f"MoeLayer.k={self.k} exceeds the {chosen * (self.num_experts // groups)}"
                       f" experts of the {self.router_name}.top_expert_groups={chosen} groups")

  def score(self, logits):
    if self.score_function == "sigmoid":
      return jax.nn.sigmoid(logits)
    if self.score_function == "sqrtsoftplus":
      return jnp.sqrt(jax.nn.softplus(logits))
    return super().score(logits)

  def renormalizes(self) -> bool:
    """Whether the gates are divided by the token's top-k score sum."""
    return self.renormalize

  def choose(self, probs: Array, *, capacity: Optional[int], token_mask: Optional[Array],
             bias: Optional[Array] = None, **policy) -> TokenChoices:
    """tokens_choose with this router's settings; bias [E] steers the choice (loss-free).
    Replayed choices (routers.REPLAY), when given, replace the choice; the gates stay this
    router's (its probabilities of the recorded experts, renormalized and scaled as it would)."""
    selection = probs if bias is None else probs + bias
    if self.num_expert_groups > 1:
      ranked = jnp.log(probs) if self.group_score_input == "logits" else selection
      group_bias = group_limit_bias(ranked, num_groups=self.num_expert_groups,
                                    groups_chosen=self.top_expert_groups, k=self.k,
                                    score_experts=self.group_score_experts)
      bias = group_bias if bias is None else bias + group_bias
    balance = None
    if self.score_function != "softmax":  # a distribution over experts for the balancing loss
      balance = probs / jnp.maximum(probs.sum(axis=-1, keepdims=True), 1e-9)
    routing = tokens_choose(probs, k=self.k, capacity=capacity,
                            batch_prioritized=self.batch_prioritized,
                            renormalize=self.renormalizes(), token_mask=token_mask,
                            selection_bias=bias, gate_scale=self.scaling_factor,
                            balance_probs=balance, drop_policy=self.drop_policy,
                            drop_rank=self.drop_rank, priority=self.priority,
                            replay=replayed_choices(self), **policy)
    if self.balance_per_k:
      routing = routing.replace(aux_loss=routing.aux_loss / self.k)
    return routing

  def assign(self, probs, *, capacity, token_mask, deterministic):
    return self.choose(probs, capacity=capacity, token_mask=token_mask)


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
    return self.choose(probs, capacity=capacity, token_mask=token_mask,
                       second_expert_policy=policy, rng=rng)


@register("topk")
class TopKRouter(TokensChooseRouter):
  """Mixtral top-k: softmax over the top-k logits, i.e. renormalized top-k probabilities."""
  renormalize: bool = True
