"""StableMoE (Dai et al. 2022, ACL): a balanced top-1 routing is learned and distilled into a
lightweight router, which then routes, frozen."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers.base import STATE, Router, RouterCost, register
from moe_jax.routing import mean_over_real_groups, valid_tokens, sigmoid_gated_top1
from moe_jax.validation import check_choice

Array = jax.Array

__all__ = ["DISTILLED_ROUTERS", "StableMoeRouter", "balance_loss", "distillation_loss"]

DISTILLED_ROUTERS = ("embedding", "projection")


def balance_loss(logits: Array, choice: Array, token_mask: Optional[Array] = None) -> Array:
  """StableMoE's balance loss per group, sum_e (|A_e| - n / E) / n * (1 / n) sum_{t in A_e}
  sigmoid(s_te), averaged over the groups with a real token.

  logits [G,S,E] the affinities s, choice [G,S] int each token's expert (A_e: expert e's real
  tokens), token_mask [G,S]; n the group's real tokens. The paper sums the scores over the tokens
  (its losses are token sums); here their sum is divided by n, per token as the task loss. Only
  the scores carry a gradient: down on the overloaded experts' affinities, up on the others'.
  Returns [] float32; 0 when every expert has n / E tokens.
  """
  valid = valid_tokens(logits, token_mask)
  assigned = jax.nn.one_hot(choice, logits.shape[-1], dtype=jnp.float32) * valid[..., None]
  count = jnp.maximum(valid.sum(axis=-1), 1.0)[:, None]  # [G,1] n
  excess = (assigned.sum(axis=1) - count / logits.shape[-1]) / count  # [G,E]
  scores = jnp.einsum("gse,gse->ge", assigned, jax.nn.sigmoid(logits.astype(jnp.float32)))
  return mean_over_real_groups(jnp.sum(excess * scores / count, axis=-1), valid)


def distillation_loss(logits: Array, target: Array, token_mask: Optional[Array] = None) -> Array:
  """Mean over the real tokens of token_mask [G,S] of the cross-entropy of softmax(logits)
  [G,S,E] against the experts target [G,S] int. Returns [] float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
  valid = valid_tokens(logits, token_mask)
  return jnp.sum(nll * valid) / jnp.maximum(valid.sum(), 1.0)


@register("stablemoe")
class StableMoeRouter(Router):
  """StableMoE: top-1 routing in two training stages, the expert's output scaled by
  sigmoid(s_te), s = x W the affinities of the learned router (the paper scores the tokens
  against expert centroids, here the columns of W).

  Stage 1 (the first distill_steps training steps): each token to argmax_e s_te; aux_loss =
  balance_weight * balance_loss (the paper's form, not Switch's) + distillation_loss of the
  distilled router's logits d against those argmax experts, which trains the distilled router
  alone. The distilled router (distilled_router):
    'embedding' (the paper's): d = V[id] K, V [num_ids, D] an embedding of the token's id (the
      LM: its byte; the ViT: its position, as hash routing), K [D,E]. Decoupled from the
      backbone: in stage 2 a token id always goes to the same expert.
    'projection' (a variant): d = (x P) K, P [M,D], x under stop_gradient; stage 2 routes by a
      fixed function of x, which still learns.
  Stage 2 (the steps after): each token to argmax_e d_te, by the distilled router as the last
  stage-1 training step left it; the gate stays sigmoid(s_te) of that expert, as in the paper
  (W keeps learning through it); aux_loss 0. Capacity keeps the first tokens of each expert
  (token order), so a token's route reads no later token.

  State, in the router_state collection (never differentiated, checkpointed; as ReMoE's L1
  weight): 'step' int32, the training calls so far (stage 1 while step < distill_steps), and a
  copy of the distilled router's weights ('distill_embedding' or 'distill_projection', and
  'distill_kernel') that stage 2 routes by (AdamW's momentum and weight decay would still move
  the parameters). Only a training call with the collection mutable moves them: it counts itself
  and, in stage 1, copies the weights. Evaluation routes by the stage the count says. The train
  config's aux_loss_weight multiplies aux_loss: the configs set it to 1 (paper_config), so
  balance_weight and 1 (the distillation's) are the coefficients.

  Settings:
    distill_steps: training steps of stage 1 (40, a tenth of the configs' 400 steps; the paper's
      stage 1 is about a tenth of the training).
    distill_dim: D (the paper: 50).
    balance_weight: alpha, the balance loss's coefficient (0.3).
    distilled_router: 'embedding' (the paper's) or 'projection'.
  """
  fixed_k = True
  learned = False  # sigmoid gates, no softmax over experts: jitter and noise do not apply
  distill_steps: int = 40
  distill_dim: int = 50
  balance_weight: float = 0.3
  distilled_router: str = "embedding"

  @property
  def uses_token_ids(self) -> bool:
    return self.distilled_router == "embedding"

  def check(self, layer):
    super().check(layer)
    if self.distill_steps < 0:
      raise self.setting_error("distill_steps", "must be >= 0")
    if self.distill_dim < 1:
      raise self.setting_error("distill_dim", "must be >= 1")
    if self.balance_weight < 0:
      raise self.setting_error("balance_weight", "must be >= 0")
    check_choice(f"MoeLayer.{self.router_name}", "distilled_router", self.distilled_router,
                 DISTILLED_ROUTERS)

  def cost(self, layer, model_dim):
    """The router kernel [M,E], the distilled router's V [num_ids,D] (a lookup, no FLOPs) or
    P [M,D], and K [D,E]."""
    learned = model_dim * self.num_experts
    kernel = self.distill_dim * self.num_experts
    if self.uses_token_ids:
      params = learned + kernel + (self.num_ids or 0) * self.distill_dim
      return RouterCost(params, 2 * (learned + kernel), layer.num_selected)
    params = learned + kernel + model_dim * self.distill_dim
    return RouterCost(params, 2 * params, layer.num_selected)

  @classmethod
  def paper_config(cls, num_experts):
    del num_experts
    return {"train.aux_loss_weight": 1.0}

  @nn.compact
  def __call__(self, x, *, capacity, token_mask=None, token_ids=None, deterministic=False):
    """x [G,S,M], token_mask [G,S], token_ids [G,S] ('embedding') -> TokenChoices (K = 1)."""
    x = x.astype(jnp.dtype(self.router_dtype))
    logits = self.compute_logits(x)  # [G,S,E] s
    self.sow("intermediates", "router_logits", logits)
    step = self.variable(STATE, "step", jnp.zeros, (), jnp.int32)
    stage1 = step.value < self.distill_steps
    training = self.trains_state(deterministic)
    distilled = self.distilled_logits(x, token_ids, stage1, training)
    choice = jnp.argmax(logits, axis=-1)  # [G,S] the learned router's
    routing = sigmoid_gated_top1(logits, jnp.where(stage1, choice, jnp.argmax(distilled, -1)),
                                 capacity=capacity, token_mask=token_mask)
    aux_loss = (self.balance_weight * balance_loss(logits, choice, token_mask)
                + distillation_loss(distilled, choice, token_mask))
    if training:
      step.value = step.value + 1
    return self.finish(routing.replace(aux_loss=jnp.where(stage1, aux_loss, 0.0)), logits,
                       token_mask)

  def distilled_logits(self, x: Array, token_ids: Optional[Array], stage1: Array,
                       training: bool) -> Array:
    """x [G,S,M], token_ids [G,S] -> [G,S,E] the distilled router's logits, V[id] K or
    (x P) K with x under stop_gradient: by the parameters in stage 1 (stage1 [] bool), by their
    copy in the state after; a training call of stage 1 copies them."""
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    first = (("distill_embedding", nn.initializers.normal(1.0), (self.num_ids, self.distill_dim))
             if self.uses_token_ids else
             ("distill_projection", init, (x.shape[-1], self.distill_dim)))
    weights = []
    for name, initializer, shape in (first, ("distill_kernel", init,
                                             (self.distill_dim, self.num_experts))):
      live = self.param(name, initializer, shape, jnp.float32)
      frozen = self.variable(STATE, name, lambda live=live: live)
      weight = jnp.where(stage1, live, jax.lax.stop_gradient(frozen.value))
      if training:
        frozen.value = jax.lax.stop_gradient(weight)
      weights.append(weight.astype(x.dtype))
    table, kernel = weights
    if self.uses_token_ids:
      return jnp.einsum("gsd,de->gse", table[token_ids], kernel)
    return jnp.einsum("gsm,md,de->gse", jax.lax.stop_gradient(x), table, kernel)
