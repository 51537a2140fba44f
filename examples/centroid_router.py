"""A router of your own with state, its own statistic and its own loss, in one file that is also
its config file (no file of moe_jax/ edited):

  python -m experiments.train --config examples/centroid_router.py --workdir runs/centroid

Each expert keeps a centroid, an exponential moving average of the tokens routed to it; a token
scores the experts by cosine similarity to their centroids and takes the top-k. A commitment
loss pulls the tokens towards the centroids they chose. The README's "Adding a router" walks
through it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import common
from moe_jax import routers


def unit(v):
  """v [..., D] scaled to unit length along D."""
  return v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)


@routers.register("centroid")
class CentroidRouter(routers.TokensChooseRouter):
  """logits_te = cos(x_t W, c_e) / temperature, then the top-k of their softmax (gates, capacity,
  load-balancing loss: TokensChooseRouter). W [M,D] is learned; the centroids c [E,D] are state:
  after each training step c_e <- decay c_e + (1 - decay) mean of unit(x W) over the tokens that
  chose e (experts that none chose keep theirs).

  Loss commitment_loss (weight train.commitment_loss_weight): the mean over the choices of real
  tokens of |unit(x W) - unit(c_e)|^2 = 2 - 2 cos, which trains W towards the chosen centroids.
  Statistic centroid_similarity: the mean cosine between two different centroids (1: collapsed).

  Settings (model.moe.centroid.<name>):
    dim: D.
    decay: of the moving average, in [0, 1).
    temperature: > 0.
  """
  losses = (routers.Loss("commitment_loss", weight=1e-2),)
  statistics = (routers.Statistic("centroid_similarity", direction=-1),)
  dim: int = 16
  decay: float = 0.99
  temperature: float = 0.1

  def check(self, layer):
    super().check(layer)
    if self.dim < 1:
      raise self.setting_error("dim", "must be >= 1")
    if not 0 <= self.decay < 1:
      raise self.setting_error("decay", "must be in [0, 1)")
    if self.temperature <= 0:
      raise self.setting_error("temperature", "must be > 0")

  def cost(self, layer, model_dim):
    flops = 2 * model_dim * self.dim + 2 * self.dim * self.num_experts
    return routers.RouterCost(model_dim * self.dim, flops, layer.num_selected)

  def centroids(self):
    """The state variable c [E,D], drawn at init from the 'params' rng stream."""
    return self.state("centroids", nn.initializers.normal(1.0), (self.num_experts, self.dim),
                      jnp.float32)

  def project(self, x):
    """x [G,S,M] -> unit(x W) [G,S,D]."""
    kernel = self.param("projection", nn.initializers.lecun_normal(), (x.shape[-1], self.dim),
                        jnp.float32)
    return unit(x @ kernel.astype(x.dtype))

  def compute_logits(self, x):
    return self.project(x) @ unit(self.centroids().value).T.astype(x.dtype) / self.temperature

  def route(self, logits, *, clean_logits, capacity, token_mask, deterministic):
    routing = super().route(logits, clean_logits=clean_logits, capacity=capacity,
                            token_mask=token_mask, deterministic=deterministic)
    chosen = routing.token_experts()[0].astype(jnp.float32)  # [G,S,E] before capacity
    distance = 2 - 2 * clean_logits * self.temperature  # |unit(x W) - unit(c_e)|^2
    self.add_loss("commitment_loss",
                  jnp.sum(chosen * distance) / jnp.maximum(jnp.sum(chosen), 1.0))
    return routing

  def update_state(self, x, routing, token_mask):
    del token_mask  # padding chose nothing
    chosen = routing.token_experts()[0].astype(jnp.float32)  # [G,S,E]
    projected = unit(x @ self.get_variable("params", "projection"))
    # The batch's sums (every micro-batch's), so that the update is the whole batch's.
    sums = routers.batch_total(self, "centroid_sums",
                               jnp.einsum("gse,gsd->ed", chosen, projected))
    counts = routers.batch_total(self, "centroid_counts", chosen.sum(axis=(0, 1)))
    old = self.get_variable(routers.STATE, "centroids")
    moved = self.decay * old + (1 - self.decay) * sums / jnp.maximum(counts, 1.0)[:, None]
    self.put_variable(routers.STATE, "centroids", jnp.where(counts[:, None] > 0, moved, old))

  def statistic_sums(self, routing, token_mask):
    del routing, token_mask
    c = unit(self.get_variable(routers.STATE, "centroids"))
    similarity = c @ c.T
    pairs = self.num_experts * (self.num_experts - 1)
    return {"centroid_similarity": (jnp.sum(similarity) - jnp.trace(similarity), pairs)}


def get_config():
  """The fashion_mnist ViT of configs/vit.py with this router, top-2 at the dense FFN's FLOPs.
  router_module names this file's module: the run's saved config loads without it (analysis)."""
  config = common.vit("centroid")
  config.model.moe.router_module = "examples.centroid_router"
  return config
