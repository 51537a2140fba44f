"""moe-jax: Mixture-of-Experts routing research in JAX/Flax (letters: see moe_jax/routing.py)."""
from moe_jax.layers import DenseFFN, MoeLayer
from moe_jax.routing import (ExpertChoiceRouter, GShardRouter, RoutingOutput, SwitchRouter,
                             TopKRouter, expert_capacity, experts_choose, importance_loss,
                             load_balancing_loss, router_z_loss, tokens_choose)
