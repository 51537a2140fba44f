"""Tokens/s and model-FLOPs utilization (MFU) of the full train step of the default configs.

For configs/vit.py:<router> and configs/lm.py:<router> (dense and every router, each dispatch
path asked for), times moe_jax.train's own jitted train step (make_steps + make_optimizer:
forward, backward, AdamW update) on synthetic batches of the configs' shapes (fashion_mnist
28x28x1 images with 10 classes; 256-byte vocabulary), so no dataset is needed.

MFU = 3 x models.flop_counts' (active_flops_per_token + head_flops_per_token) x tokens per step
/ step time / peak, where the peak is the best rate of a square matmul in --dtype (float32 by
default; bfloat16 also sets every config's model.dtype) sampled between the steps of the same run
(moe_layer.MatmulPeak). All rows are compiled first and then timed in interleaved rounds; each
row's time is its best step.
Model FLOPs are the matmuls of the blocks (the MoE layers' k active experts and router) and
those outside them (the patch embedding and classifier, the LM's tied output head); they exclude
dispatch/combine, norms and the optimizer: work that is not model math lowers the MFU, as it
should.

  python benchmarks/train_step.py                     # both models, the whole zoo
  python benchmarks/train_step.py --models vit --routers dense,switch --repeats 3
  python benchmarks/train_step.py --models vit --routers dense,topk --set model.width=512 \
      --set model.mlp_dim=4096 --set model.num_heads=8   # M, H of the MoE layer's reference

A run compiles every row of a model before it times them, so it holds all their parameters and
optimizer states at once: at width 512, five routers of both models in one process did not fit
in 24 GB (the LM has 16 experts in every layer); run the models one at a time there.

`--set` changes a config field before the router's equal-FLOP rule is applied again
(configs/common.with_router), so expert widths follow model.mlp_dim.

Prints a table and writes JSON (default benchmarks/results/train_step.json).
"""
from __future__ import annotations

import argparse
import ast
import gc
import importlib
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from benchmarks.moe_layer import MatmulPeak, write_result  # noqa: E402
from configs import common  # noqa: E402
from moe_jax import dispatch, models, routers, train  # noqa: E402

# Every router and variant; the LM refuses the ones that read later tokens of a group.
ROUTERS = {"vit": common.zoo(),
           "lm": tuple(r for r in common.zoo() if r in common.VARIANTS + ("dense",)
                       or routers.get(r).causal_safe)}
DATA_INFO = {
    "vit": dict(kind="image", image_shape=(28, 28, 1), num_classes=10),
    "lm": dict(kind="text", vocab_size=256),
}


def parse_args(argv=None):
  """The arguments of argv (None: the command line's)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="vit,lm",
                      help="config modules: configs/<name>.py (vit, lm, lm_gpu, ...)")
  parser.add_argument("--routers", default="",
                      help="comma list; default: every router the model allows (others are "
                           "skipped)")
  parser.add_argument("--dispatch-paths", default="index,einsum,dropless,merge",
                      help="for MoE configs; each router runs on the paths that take its form "
                           "(dispatch.PATH_FORMS: merge for smear alone)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. model.width=512 (repeatable)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--peak-size", type=int, default=2048)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="model.dtype of every config and the dtype of the peak's matmul")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "train_step.json"))
  return parser.parse_args(argv)


def with_overrides(config, router, overrides):
  """config with FIELD=VALUE overrides (values parsed as Python literals where they parse), then
  the router's equal-FLOP rule again."""
  if not overrides:
    return config
  for item in overrides:
    field, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. model.width=512")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    target = config
    *parents, leaf = field.split(".")
    for parent in parents:
      target = target[parent]
    if leaf not in target:
      raise ValueError(f"--set {item!r}: {field} is not a config field")
    target[leaf] = value
  return common.with_router(config, router)


def data_info(name, config):
  """The data_info of configs/<name>.py's dataset (the LM's seq_len from the config)."""
  return DATA_INFO[name] | ({"seq_len": config.data.seq_len} if name == "lm" else {})


def time_interleaved(rows, timed_steps, peak, repeats):
  """Sets each row's "ms" to the best of `repeats` rounds over all rows' timed_steps (functions
  returning seconds), the peak sampled before each, so slow spells of this shared machine hit all
  rows alike instead of whichever row runs during them."""
  for row in rows:
    row["ms"] = math.inf
  for _ in range(repeats):
    for row, timed_step in zip(rows, timed_steps):
      peak.sample()
      row["ms"] = min(row["ms"], 1e3 * timed_step())


def synthetic_batch(config, info):
  rng = jax.random.key(0)
  size = config.train.batch_size
  if info["kind"] == "image":
    return {"image": jax.random.uniform(rng, (size, *info["image_shape"])),
            "label": jax.random.randint(rng, (size,), 0, info["num_classes"])}
  tokens = jax.random.randint(rng, (size, config.data.seq_len + 1), 0, info["vocab_size"])
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def compile_train_step(config, info):
  """Jits and runs the config's train step once on a synthetic batch; returns a function that
  runs one more step and returns its seconds."""
  model = models.get_model(config.model, info)
  batch = synthetic_batch(config, info)
  optimizer = train.make_optimizer(config.train)
  variables = nn.meta.unbox(jax.jit(lambda rng: model.init(
      {"params": rng, "dropout": rng, "routing": rng}, batch[train.INPUT_KEY[info["kind"]]],
      deterministic=True))(jax.random.key(0)))
  params = variables["params"]
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           train.STATE: variables.get(train.STATE, {}), "opt_state": optimizer.init(params),
           "rng": jax.random.key_data(jax.random.key(0))}
  train_step, _ = train.make_steps(model, optimizer, config.train, info["kind"])
  step = jax.jit(train_step, donate_argnums=0)
  state, _ = jax.block_until_ready(step(state, batch))

  def timed_step():
    nonlocal state
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, batch))
    return time.perf_counter() - start

  return timed_step


def compile_rows(name, args):
  """(rows, timed steps) of configs/<name>.py: every router of `args` on each path it takes."""
  config_module = importlib.import_module(f"configs.{name}")
  kind = config_module.get_config().model.name  # vit or lm: the data and the routers it allows
  rows, steps = [], []
  for router in (args.routers.split(",") if args.routers else ROUTERS[kind]):
    if router not in ROUTERS[kind]:
      print(f"configs/{name}.py:{router} skipped: not one of {', '.join(ROUTERS[kind])}")
      continue
    moe_router = config_module.get_config(router).model.moe.router
    paths = (["-"] if moe_router == "dense" else  # dense, and Mixture-of-Depths (no MoE layer)
             [p for p in args.dispatch_paths.split(",")
              if routers.get(moe_router).form in dispatch.PATH_FORMS[p]])
    for path in paths:
      config = with_overrides(config_module.get_config(router), router,
                              [f"model.dtype={args.dtype}"] + args.set)
      if path != "-":
        config.model.moe.dispatch_path = path
      info = data_info(kind, config)
      tokens = config.train.batch_size * train.tokens_per_example(config.model, info)
      counts = models.flop_counts(config.model, info)
      flops = 3 * (counts["active_flops_per_token"] + counts["head_flops_per_token"]) * tokens
      steps.append(compile_train_step(config, info))
      rows.append(dict(model=name, config=f"configs/{name}.py:{router}", path=path,
                       tokens_per_step=tokens, model_flops_per_step=flops))
      print(f"compiled {rows[-1]['config']} {path}", flush=True)
  return rows, steps


def measure(args, peak):
  """Compiles and times the train step of every config of `args` (parse_args) against `peak`
  (a moe_layer.MatmulPeak); returns the rows, printed as a table."""
  # One model at a time: its rows are compiled first, then timed in interleaved rounds
  # (time_interleaved), then released. Each compiled step keeps several hundred memory maps of
  # XLA:CPU's code; the zoo of both models at once (82 steps compiled) hit the kernel's limit
  # (vm.max_map_count 65530): LLVM "Cannot allocate memory" with most memory free, then a
  # segmentation fault.
  rows = []
  for name in args.models.split(","):
    model_rows, steps = compile_rows(name, args)
    time_interleaved(model_rows, steps, peak, args.repeats)
    rows += model_rows
    del steps
    jax.clear_caches()
    gc.collect()
  dense_ms = {row["model"]: row["ms"] for row in rows if row["config"].endswith(":dense")}
  print(f"{'config':<25} {'path':<9} {'ms':>8} {'tokens/s':>10} {'MFU':>6} {'x dense':>8}")
  peak.sample(10)
  for row in rows:  # against the run's best peak
    seconds = row["ms"] / 1e3
    row["tokens_per_s"] = row["tokens_per_step"] / seconds
    row["mfu"] = row["model_flops_per_step"] / seconds / peak.best
    row["vs_dense"] = row["ms"] / dense_ms.get(row.pop("model"), math.nan)
    print("{config:<25} {path:<9} {ms:>8.1f} {tokens_per_s:>10,.0f} {mfu:>6.1%} "
          "{vs_dense:>8.2f}".format(**row))
  print(f"(MFU against the run's best matmul peak, {peak.best / 1e9:.1f} GFLOP/s)")
  return rows


def main():
  args = parse_args()
  peak = MatmulPeak(args.peak_size, jnp.dtype(args.dtype))
  print(f"matmul peak ({args.peak_size}^2 {args.dtype}) at start: "
        f"{peak.sample(10) / 1e9:.1f} GFLOP/s")
  rows = measure(args, peak)
  write_result(args.out, "train_step", args, peak, rows)
  print(f"JSON: {args.out}")


if __name__ == "__main__":
  main()
