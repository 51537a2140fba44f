"""Shared bases for the configs in this folder (each config file returns one of these, changed).

All routers are compared at equal active FLOPs: an MoE layer's experts have hidden width
mlp_dim / k (expert choice: mlp_dim / capacity_factor; soft: mlp_dim / slots per token), so a
token costs what the dense FFN of width mlp_dim costs (plus the router; Soft MoE's router also
mixes the tokens into its slots and back, which costs more than the others', and SMEAR's merges
the experts' parameters per group: models/common.py).
Two variants of the layer, named like routers, keep it too:
  deepseek  DeepSeekMoE: top-2 experts split 4 ways (granularity 4: 4E experts of width
            mlp_dim / 8), 2 of the 8 active ones always-on shared experts, 6 routed.
  residual  Residual-MoE (PR-MoE): a top-1 expert and a dense MLP, each of width mlp_dim / 2,
            mixed per token by a learned coefficient.
One variant is not MoE and is cheaper, compared at its reported active FLOPs:
  mod       Mixture-of-Depths (Raposo et al. 2024): dense blocks, of which every other one
            processes only the top 12.5% of each sequence's tokens (models/mod.py).
"""
from moe_jax import routers
from moe_jax.config import default_config

VARIANTS = ("deepseek", "residual", "mod")


def zoo(router_module: str = "") -> tuple:
  """Every router and variant at equal active FLOPs: the zoo sweep (configs/sweeps/zoo.py). The
  routers registered when it is called, those of `router_module` (imported here) among them."""
  routers.import_module(router_module)
  return (("dense",) + tuple(name for name in routers.names() if routers.get(name).in_zoo)
          + VARIANTS)


def with_router(config, router):
  """Sets the MoE router or variant, keeping the active FLOPs of the dense FFN (`dense`: no MoE
  layers): the router's paper settings (its `paper_config`: expert choice's capacity factor
  c = 2, Soft MoE's one slot per token, V-MoE's logit noise 1 / E and loss weight 0.005), then
  experts of width mlp_dim / (experts per token: k, or the capacity factor of the routers
  without k).
  """
  moe = config.model.moe
  if router == "deepseek":
    with_router(config, "topk")  # experts of width mlp_dim / 2 before the split
    moe.granularity, moe.num_shared_experts = 4, 2
    moe.k = routers.get("topk").default_k * moe.granularity - moe.num_shared_experts
    return config
  if router == "residual":
    with_router(config, "switch")
    moe.residual = True
    moe.expert_hidden_dim = config.model.mlp_dim // 2
    return config
  if router == "mod":  # the paper's every other block at capacity 12.5%
    with_router(config, "dense")
    mod = config.model.mod
    mod.every, mod.capacity = 2, 0.125
    if config.model.name == "lm":  # evaluates by the causal predictor; positions in the tokens
      mod.predictor_dim = config.model.width // 2
      config.model.positions = "learned"
    return config
  if router not in ("dense",) + routers.names():
    raise ValueError(f"router={router!r} has no equal-FLOP rule in configs/common.py; allowed: "
                     f"{', '.join(map(repr, ('dense',) + routers.names() + VARIANTS))}")
  moe.router = router
  if router == "dense":
    return config
  router_cls = routers.get(router)
  for path, value in router_cls.paper_config(moe.num_experts).items():
    *parents, field = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  experts_per_token = (router_cls.equal_flops_experts or router_cls.default_k
                       or moe.capacity_factor)
  moe.expert_hidden_dim = int(config.model.mlp_dim // experts_per_token)
  return config


def vit(router):
  """ViT (4 layers, width 128, 4x4 patches) on fashion_mnist, MoE in layers 1 and 3."""
  c = default_config()
  c.data.name = "fashion_mnist"
  c.model.name = "vit"
  c.model.patch_size = 4  # 49 patches + class token = 50 tokens per image
  c.model.moe.num_experts = 8
  c.model.moe.group_size = 200  # 4 images per group; divides the 6400 tokens of a batch
  c.train.batch_size = 128
  c.train.num_steps = 400
  c.train.learning_rate = 1e-3
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  with_router(c, router)
  if router == "smear":  # the paper merges the experts per example: a group is one image
    c.model.moe.group_size = 50
  return c


def lm(router):
  """Byte-level decoder LM (4 layers, width 128, RoPE, RMSNorm) on the Python stdlib sources,
  MoE in every layer, 16 experts.

  The MoE placement is measured (one seed, eval bits per byte on 82k validation bytes, top-2 at
  equal active FLOPs): with 8 experts in every other layer, top-2 ended level with dense after
  1000 steps (1.989 vs 1.988; 2.439 vs 2.417 at 400), so no router could beat dense; with 16
  experts in every layer it led by 0.034, 0.047 and 0.056 at steps 200, 400 and 600.
  """
  c = default_config()
  c.data.name = "python_stdlib_bytes"
  c.data.seq_len = 128
  c.model.name = "lm"
  c.model.norm = "rmsnorm"
  c.model.positions = "rope"
  c.model.moe.num_experts = 16
  c.model.moe.every = 1
  c.model.moe.group_size = 128  # one sequence per group
  c.train.batch_size = 32
  c.train.num_steps = 400
  c.train.learning_rate = 2e-3
  c.train.eval_every = 100
  c.train.eval_max_batches = 40  # 40 x 32 windows of 128 bytes: 164k validation bytes
  c.train.checkpoint_every = 100
  return with_router(c, router)


def lm_domains(router):
  """The byte-level LM of `lm` on multidomain_bytes (8 domains: 5 natural languages in 3 scripts,
  Python, C, HTML; each batch holds every domain equally), 16 experts in every layer: the
  domain router gives each domain 2 of them (configs/sweeps/headroom.py) and routes groups of 8
  sequences (with data.domain_mix='natural' a group's domains are not balanced, and its
  experts' capacity drops choices again)."""
  c = lm(router)
  c.data.name = "multidomain_bytes"
  if router == "domain":
    # A group of one sequence (128 tokens) sends all of them to its domain's experts, whose
    # capacity (1.25 x 128 x k / E = 20 slots each) kept 40 of the 256 choices: 0.31 experts
    # per token. A group of 8 sequences holds one of each domain (balanced batches put domain d
    # at rows d, d + 8, ...), so each domain's 128 tokens meet 160 slots: nothing is dropped.
    c.model.moe.group_size = 8 * c.data.seq_len
  return c
