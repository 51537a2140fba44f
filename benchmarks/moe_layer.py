"""Forward+backward time of MoeLayer, every router and dispatch path, against a dense FFN.

The dense FFN has the same active FLOPs per token (hidden width k * H; expert choice with capacity
factor c processes c experts per token on average, so it is compared with width c * H). All rows
are timed in one run on the same tokens; compare ratios, not absolute times (machines are noisy).

  python benchmarks/moe_layer.py                      # reference config (float32, T=8192, M=512,
                                                      #   H=2048, E=8, cf=1.25), about 3 min on 2 cores
  python benchmarks/moe_layer.py --tokens 2048 --model-dim 256 --hidden-dim 1024   # quick look

Prints a table and writes JSON (default benchmarks/results/moe_layer.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import jax
import jax.numpy as jnp

from moe_jax.layers import DenseFFN, MoeLayer

ROUTERS = ("switch", "gshard", "topk", "expert_choice")
PATHS = ("einsum", "index")


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--model-dim", type=int, default=512)
  parser.add_argument("--hidden-dim", type=int, default=2048)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--group-size", type=int, default=256)
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--ec-capacity-factor", type=float, default=2.0,
                      help="expert choice's mean experts per token (the paper's c)")
  parser.add_argument("--activation", default="gelu")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--routers", default=",".join(ROUTERS))
  parser.add_argument("--paths", default=",".join(PATHS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "moe_layer.json"))
  return parser.parse_args()


def time_forward_backward(layer, x, repeats):
  """Median seconds of one jitted forward+backward, and the last call's sown state."""
  variables = layer.init({"params": jax.random.key(0), "routing": jax.random.key(1)}, x)
  params = variables["params"]
  cotangent = jax.random.normal(jax.random.key(2), x.shape, x.dtype)

  @jax.jit
  def step(params, x, rng):
    def loss(params, x):
      y, state = layer.apply({"params": params}, x, rngs={"routing": rng},
                             mutable=["losses", "routing_stats"])
      return jnp.sum(y * cotangent), state
    grads, state = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return grads, state

  jax.block_until_ready(step(params, x, jax.random.key(3)))  # compile
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    _, state = jax.block_until_ready(step(params, x, jax.random.key(4 + i)))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def main():
  args = parse_args()
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(0), (args.tokens, args.model_dim), dtype)
  rows, dense_seconds = [], {}

  def dense_time(width):
    if width not in dense_seconds:
      layer = DenseFFN(width, activation=args.activation, dtype=dtype)
      dense_seconds[width], _ = time_forward_backward(layer, x, args.repeats)
    return dense_seconds[width]

  for router in args.routers.split(","):
    expert_choice = router == "expert_choice"
    factor = args.ec_capacity_factor if expert_choice else args.capacity_factor
    for path in args.paths.split(","):
      layer = MoeLayer(num_experts=args.experts, expert_hidden_dim=args.hidden_dim,
                       router=router, capacity_factor=factor, group_size=args.group_size,
                       dispatch_path=path, activation=args.activation, dtype=dtype)
      seconds, state = time_forward_backward(layer, x, args.repeats)
      active = factor if expert_choice else layer.num_selected
      dense_width = round(active * args.hidden_dim)
      stats = state["routing_stats"]["stats"][0]
      rows.append(dict(router=router, path=path, active_experts=active,
                       ms=1e3 * seconds, dense_ms=1e3 * dense_time(dense_width),
                       vs_dense=seconds / dense_time(dense_width),
                       dropped_fraction=float(stats["dropped_fraction"]),
                       load_cv=float(stats["load_cv"])))
      print_row(rows[-1], header=len(rows) == 1)

  result = dict(
      benchmark="moe_layer forward+backward",
      date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                   jax=jax.__version__),
      config=vars(args), rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nT={args.tokens} M={args.model_dim} H={args.hidden_dim} E={args.experts} "
        f"S={args.group_size} cf={args.capacity_factor} {args.dtype} on "
        f"{jax.default_backend()}; JSON: {args.out}")


def print_row(row, header):
  columns = [("router", "{:<14}"), ("path", "{:<7}"), ("active_experts", "{:>6}"),
             ("ms", "{:>9.1f}"), ("dense_ms", "{:>9.1f}"), ("vs_dense", "{:>9.2f}"),
             ("dropped_fraction", "{:>9.3f}"), ("load_cv", "{:>8.3f}")]
  titles = dict(active_experts="k", dropped_fraction="dropped", vs_dense="x dense")
  if header:
    print(" ".join(fmt.replace(".1f", "").replace(".2f", "").replace(".3f", "")
                   .format(titles.get(name, name)) for name, fmt in columns))
  print(" ".join(fmt.format(row[name]) for name, fmt in columns), flush=True)


if __name__ == "__main__":
  main()
