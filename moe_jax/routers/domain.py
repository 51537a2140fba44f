"""DEMix domain routing (Gururangan et al. 2022): the oracle bracket of routing on data with
domain labels (multidomain_bytes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.base import register
from moe_jax.routers.top_k import TopKRouter

Array = jax.Array

__all__ = ["DomainRouter"]


@register("domain")
class DomainRouter(TopKRouter):
  """Each of the D domains owns E / D consecutive experts (domain d: experts d E/D ..
  (d + 1) E/D - 1) and a token goes to the experts of its sequence's domain: the top-k of a
  learned softmax over those experts alone, renormalized (Mixtral's gates). With k = E / D, the
  default pairing (E = 16 experts for D = 8 domains, top-2), a token uses all of its domain's
  experts and the router learns only their gates; with E = D and k = 1 it is the paper's one
  expert per domain, gate 1.

  The domain comes from the data (the model passes each token its sequence's label as the ids
  it routes by), so routing reads no other token: causal-safe. It is what routing could gain if
  it knew the domain; learned routers are placed between it and random routing (configs/sweeps/
  headroom.py, zoo_domains.py). Not in common.zoo(): the zoo's other testbeds have no domains.

  Capacity: a domain's tokens all ask for the same E / D experts, so a group of one domain's
  tokens overflows them (one sequence of 128 tokens, E = 16, k = 2, capacity factor 1.25: 20
  slots an expert, 40 of 256 choices kept). Groups that hold every domain alike (balanced
  batches, group_size = D sequences: configs/lm_domains.py) or dispatch_path='dropless' keep
  every choice.
  """
  uses_domains = True
  replays = False
  prioritizes = False  # the choice is the domain's, not a competition by probability
  in_zoo = False

  def check(self, layer):
    super().check(layer)
    if self.num_ids is None:  # the model sets the domain count from the data (models/common)
      return
    if self.num_experts % self.num_ids:
      raise ValueError(f"MoeLayer.num_experts={self.num_experts} must be a multiple of the "
                       f"{self.num_ids} domains for router='domain' (each domain owns "
                       "num_experts / domains experts)")
    owned = self.num_experts // self.num_ids
    if self.k > owned:
      raise ValueError(f"MoeLayer.k={self.k} exceeds the {owned} experts each domain owns "
                       f"(num_experts={self.num_experts} / {self.num_ids} domains) for "
                       "router='domain'")

  def restrict(self, logits: Array, token_ids: Array) -> Array:
    """logits [G,S,E], token_ids [G,S] the tokens' domains -> the logits of experts outside the
    token's domain set to -inf (their probability 0: never chosen, no gradient)."""
    owner = jnp.arange(self.num_experts) // (self.num_experts // self.num_ids)  # [E]
    return jnp.where(owner == token_ids[..., None], logits, -jnp.inf)
