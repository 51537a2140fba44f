"""moe-jax: Mixture-of-Experts routing research in JAX/Flax (letters: see moe_jax/routing.py).

The public API: the layers, the routers and their registry, the routing forms and functions.
Modules: routing (forms and math), routers/ (router modules by name), dispatch (moving tokens),
experts (expert computations), layers (MoeLayer, DenseFFN), metrics, models, train, sweep,
compare, analysis, report.
"""
from moe_jax import routers
from moe_jax.layers import DenseFFN, MoeLayer
from moe_jax.routers import Router, register
from moe_jax.routing import (ExpertSlots, MergeWeights, RoutingOutput, SoftSlots, TokenChoices,
                             expert_capacity, experts_choose, importance_loss,
                             load_balancing_loss, router_z_loss, tokens_choose)

__all__ = ["DenseFFN", "ExpertSlots", "MergeWeights", "MoeLayer", "Router", "RoutingOutput",
           "SoftSlots", "TokenChoices", "expert_capacity", "experts_choose", "importance_loss",
           "load_balancing_loss", "register", "router_z_loss", "routers", "tokens_choose"]
