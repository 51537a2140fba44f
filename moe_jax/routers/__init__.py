"""Routers by name: the registry (base.py) and the built-in routers, one family per module.

  routers.get("topk")          the class registered as 'topk'
  routers.names()              every registered name
  @routers.register("mine")    a router of your own (examples/temperature_router.py,
                               examples/centroid_router.py)
"""
from moe_jax.routers.base import (COUNTS, LEGACY_STATE, REGISTRY, REPLAY, ROUTER_DTYPES, STATE,
                                  TRACE, Loss, Router, RouterCost, Statistic, batch_total, get,
                                  import_module, loss_weights, names, register, renamed_state,
                                  replayed_choices, statistic_directions)
# The built-in routers register themselves on import, in this order (the zoo's).
from moe_jax.routers.top_k import GShardRouter, SwitchRouter, TokensChooseRouter, TopKRouter
from moe_jax.routers.expert_choice import ExpertChoiceRouter
from moe_jax.routers.vmoe import VMoeRouter
from moe_jax.routers.soft import SoftMoeRouter
from moe_jax.routers.fixed import FixedRouter, HashRouter, RandomRouter
from moe_jax.routers.balanced import BaseRouter
from moe_jax.routers.loss_free import LossFreeRouter
from moe_jax.routers.cosine import CosineRouter
from moe_jax.routers.sinkhorn import SBaseRouter
from moe_jax.routers.top_p import TopPRouter
from moe_jax.routers.forced import ForcedRouter
from moe_jax.routers.sparse_gates import DSelectKRouter, PositiveGateRouter, ReMoeRouter
from moe_jax.routers.moepp import MoePlusPlusRouter
from moe_jax.routers.stablemoe import StableMoeRouter
from moe_jax.routers.smear import SmearRouter
from moe_jax.routers.domain import DomainRouter

__all__ = ["COUNTS", "LEGACY_STATE", "REGISTRY", "REPLAY", "ROUTER_DTYPES", "STATE", "TRACE",
           "BaseRouter", "CosineRouter", "DSelectKRouter", "DomainRouter", "ExpertChoiceRouter",
           "FixedRouter", "ForcedRouter", "GShardRouter", "HashRouter", "Loss", "LossFreeRouter",
           "MoePlusPlusRouter", "PositiveGateRouter", "RandomRouter", "ReMoeRouter", "Router",
           "RouterCost", "SBaseRouter", "SmearRouter", "SoftMoeRouter", "StableMoeRouter",
           "Statistic", "SwitchRouter", "TokensChooseRouter", "TopKRouter", "TopPRouter",
           "VMoeRouter", "batch_total", "get", "import_module", "loss_weights", "names",
           "register", "renamed_state", "replayed_choices", "statistic_directions"]
