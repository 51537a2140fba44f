"""Forward+backward time of MoeLayer, every router, dispatch path and expert count, against a dense
FFN of the same active FLOPs and against the measured matmul peak of this machine.

The dense FFN has the same active FLOPs per token (hidden width k * H; expert choice with capacity
factor c processes c experts per token on average, so it is compared with width c * H). The expert
hidden width H stays fixed as E grows, so the active FLOPs stay fixed too. The peak is the best
rate of a square float32 matmul sampled between the timed steps of the same run; compare ratios,
not absolute times (machines are noisy). All rows are compiled first (the default grid holds
every E = 64 layer's weights at once: a few GB) and timed in interleaved rounds; each row's time
is its best step.

Columns: `useful` = rate of the useful FLOPs (expert matmuls of the kept (token, choice) pairs,
forward+backward = 3 x forward) over the peak; `x dense` = time over the dense FFN's time;
`x ref` = time over the issue's reference dense FFN (row `dense_ref`: the same FFN written the
usual Flax way, nn.DenseGeneral on [batch, length, M] activations of REFERENCE_LENGTH-token
sequences, as flaxformer's MlpBlock does; on XLA:CPU its weight gradients go through slow
transposes, and it reaches about 42% of the peak, the issue's anchor);
`xla/model` = XLA's own FLOP count (compiled cost_analysis) over the analytic cost model
(docs/ROUTING.md: einsum cf (1 + 2S/(nH)), index cf, dropless chunks 1 + about half a 32-row
chunk per expert, all x useful; dropless blocks B (ceil(N/B) + E) rows for N pairs; ragged_dot E N
rows off TPU; plus the router); the chunks form runs its experts in loops, whose bodies XLA counts
once, so its ratio is meaningless. `temp MB` = compiled temp memory (memory_analysis).

  python benchmarks/moe_layer.py                      # reference config (float32, T=8192, M=512,
                                                      #   H=2048, E=8/32/64, cf=1.25); long
  python benchmarks/moe_layer.py --experts 8 --routers topk --repeats 3   # the headline rows
  python benchmarks/moe_layer.py --tokens 2048 --model-dim 256 --hidden-dim 1024   # quick look

Prints tables and writes JSON (default benchmarks/results/moe_layer.json).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch, experts
from moe_jax.dispatch import MIN_CHUNK_ROWS
from moe_jax.layers import DenseFFN, MoeLayer

ROUTERS = ("switch", "gshard", "topk", "expert_choice")
PATHS = ("einsum", "index", "dropless")
REFERENCE_LENGTH = 1024  # tokens per sequence of the reference dense FFN's [batch, length, M]


class ReferenceDenseFFN(nn.Module):
  """The dense FFN as most Flax Transformers write it: x [T,M] seen as [T / L, L, M] sequences,
  nn.DenseGeneral in and out (gelu, relu or swiglu)."""
  hidden_dim: int
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    sequences = x.reshape(-1, min(REFERENCE_LENGTH, x.shape[0]), x.shape[-1])
    dense = lambda features: nn.DenseGeneral(features, use_bias=False, dtype=self.dtype)
    inputs = dispatch.expert_matrices(self.activation) - 1  # (w_in,) or (w_gate, w_up)
    hidden = experts.activate(self.activation,
                              *(dense(self.hidden_dim)(sequences) for _ in range(inputs)))
    return dense(x.shape[-1])(hidden).reshape(x.shape)


def parse_args(argv=None):
  """The arguments of argv (None: the command line's)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--model-dim", type=int, default=512)
  parser.add_argument("--hidden-dim", type=int, default=2048)
  parser.add_argument("--experts", default="8,32,64")
  parser.add_argument("--group-sizes", default="auto,1024",
                      help="einsum and index group sizes; 'auto' = dispatch.auto_group_size")
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--ec-capacity-factor", type=float, default=2.0,
                      help="expert choice's mean experts per token (the paper's c)")
  parser.add_argument("--activation", default="gelu")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--routers", default=",".join(ROUTERS))
  parser.add_argument("--paths", default=",".join(PATHS))
  parser.add_argument("--dropless-forms", default=dispatch.default_dropless_form(),
                      help="comma list of dispatch.DROPLESS_FORMS")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak-size", type=int, default=2048)
  parser.add_argument("--memory-tokens", default="4096,16384",
                      help="token counts of the compile-only memory table ('' to skip)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "moe_layer.json"))
  return parser.parse_args(argv)


class MatmulPeak:
  """The best FLOP/s seen for a [size,size] x [size,size] matmul in the benchmark's dtype (a
  GPU's bf16 peak is many times its float32 one).

  Sampled between the timed steps of every row, so that the peak is measured under the same
  (shared, noisy) machine conditions as the rows; the best sample of the whole run is the peak.
  """

  def __init__(self, size: int, dtype=jnp.float32):
    self.size = size
    self.a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    self.matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(self.matmul(self.a, self.a))
    self.best = 0.0

  def sample(self, repeats: int = 1) -> float:
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(self.matmul(self.a, self.a))
      self.best = max(self.best, 2 * self.size ** 3 / (time.perf_counter() - start))
    return self.best


def machine_info() -> dict:
  """What the numbers depend on: processor, platform, backend, jax, and the preloaded allocator
  (the Makefile preloads tcmalloc; glibc's malloc is slower here, BENCHMARKS.md)."""
  return dict(processor=processor_name(), platform=platform.platform(), cpu_count=os.cpu_count(),
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, flax=importlib.metadata.version("flax"),
              ld_preload=os.environ.get("LD_PRELOAD", ""))


def processor_name() -> str:
  """The CPU's model name (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def source_commit() -> str:
  """The repository's short commit, '+' when its tracked files have changes other than
  benchmarks/results/ (what the benchmarks write) ('' outside git)."""
  git = lambda *a: subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *a],
                                  capture_output=True, text=True)
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode:
    return ""
  changed = git("status", "--porcelain", "-uno", "--", ":(top)",
                ":(exclude,top)benchmarks/results").stdout
  return head.stdout.strip() + ("+" if changed else "")


def write_result(path, benchmark, args, peak, rows, **extra) -> None:
  """Writes a benchmark's JSON: what ran (command line, commit), when, where (with the load
  average), its peak and rows."""
  command = [os.path.relpath(sys.argv[0])] + sys.argv[1:]
  result = dict(benchmark=benchmark, command=shlex.join(command), commit=source_commit(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=machine_info() | dict(load_average=os.getloadavg()), config=vars(args),
                peak_flops=peak.best, rows=rows, **extra)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def forward_backward(layer, x):
  """(jitted step, params) of one forward+backward; step returns (grads, sown state)."""
  init = jax.jit(lambda x: layer.init({"params": jax.random.key(0),
                                       "routing": jax.random.key(1)}, x)["params"])
  params = nn.meta.unbox(init(x))
  cotangent = jax.random.normal(jax.random.key(2), x.shape, x.dtype)

  @jax.jit
  def step(params, x, rng):
    def loss(params, x):
      y, state = layer.apply({"params": params}, x, rngs={"routing": rng},
                             mutable=["losses", "routing_stats"])
      return jnp.sum(y * cotangent), state
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  return step, params


def compile_step(module, x):
  """Compiles and runs once a forward+backward of module on x. Returns (run, XLA's FLOPs, temp
  bytes), where run(i) runs one more step (routing rng i) and returns (seconds, sown state)."""
  step, params = forward_backward(module, x)
  compiled = step.lower(params, x, jax.random.key(3)).compile()
  xla_flops = compiled.cost_analysis().get("flops", float("nan"))
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(params, x, jax.random.key(3)))

  def run(i):
    start = time.perf_counter()
    _, state = jax.block_until_ready(compiled(params, x, jax.random.key(4 + i)))
    return time.perf_counter() - start, state

  return run, xla_flops, temp_bytes


def model_flops(layer, path, form, tokens, model_dim, stats):
  """(useful, modelled) forward+backward FLOPs of one MoeLayer call (3 x forward).

  useful: expert matmuls of the kept pairs. modelled: what the path computes by the cost model.
  """
  n = dispatch.expert_matrices(layer.activation)
  per_row = 2 * n * model_dim * layer.expert_hidden_dim  # one token through one expert
  router = 2 * model_dim * layer.num_experts * tokens
  group_size = min(layer.resolved_group_size(tokens), tokens)
  groups = math.ceil(tokens / group_size)
  capacity = layer.capacity(group_size, deterministic=False)
  if layer.router == "expert_choice":
    kept = groups * layer.num_experts * capacity
  else:
    kept = (1 - float(stats["dropped_fraction"])) * layer.num_selected * tokens
  slots = groups * layer.num_experts * capacity
  if path == "einsum":
    rows = slots * (1 + 2 * group_size / (n * layer.expert_hidden_dim))
  elif path == "index":
    rows = slots
  elif form == "ragged_dot" and jax.default_backend() != "tpu":
    rows = layer.num_experts * layer.num_selected * tokens  # lowered densely (CPU, GPU)
  elif form == "blocks":  # every block, the padded and the empty ones too
    pairs = layer.num_selected * tokens
    rows = dispatch.block_rows(pairs, layer.num_experts,
                               dispatch.dropless_block_size(pairs, layer.num_experts))
  else:  # chunks: about half a smallest chunk of waste per expert; a lower estimate, since a
    # last chunk can waste up to a quarter of a larger one (experts._over_chunks)
    rows = layer.num_selected * tokens + layer.num_experts * MIN_CHUNK_ROWS / 2
  return 3 * per_row * kept, 3 * (per_row * rows + router)


def measure(args, peak=None):
  """Compiles and times every row of `args` (parse_args), with the dense FFNs, against `peak`
  (None: a MatmulPeak of its own); returns (peak, rows, memory table). A row that fails to
  compile (out of memory, a form the backend lacks) is printed and left out."""
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(0), (args.tokens, args.model_dim), dtype)
  n = dispatch.expert_matrices(args.activation)
  peak = MatmulPeak(args.peak_size, dtype) if peak is None else peak
  print(f"matmul peak ({args.peak_size}^2 {args.dtype}) at start: "
        f"{peak.sample(10) / 1e9:.1f} GFLOP/s", flush=True)
  # Every row is compiled first, then all are timed in interleaved rounds (each row's best), so
  # that a slow spell of the machine hits all rows alike: the ratios between rows (x dense,
  # E = 8 -> 64) stay comparable.
  rows, runs, dense_ms = [], [], {}

  def add_row(row, module):
    try:
      run, xla_flops, temp = compile_step(module, x)
    except Exception as error:  # one row's failure must not end the run
      print(f"failed {row['router']} {row['path']} E={row['experts']}: "
            f"{type(error).__name__}: {str(error)[:300]}", flush=True)
      return
    rows.append(row | dict(ms=math.inf, xla_flops=xla_flops, temp_mb=temp / 2 ** 20))
    runs.append(run)
    print(f"compiled {row['router']} {row['path']} E={row['experts']}", flush=True)

  for num_experts in map(int, args.experts.split(",")):
    for router in args.routers.split(","):
      expert_choice = router == "expert_choice"
      factor = args.ec_capacity_factor if expert_choice else args.capacity_factor
      for path in args.paths.split(","):
        if path == "dropless" and expert_choice:
          continue
        variants = ([(None, f) for f in args.dropless_forms.split(",")] if path == "dropless"
                    else [(None if s == "auto" else int(s), None)
                          for s in args.group_sizes.split(",")])
        for group_size, form in variants:
          layer = MoeLayer(num_experts=num_experts, expert_hidden_dim=args.hidden_dim,
                           router=router, capacity_factor=factor, group_size=group_size,
                           dispatch_path=path, dropless_form=form,
                           activation=args.activation, dtype=dtype)
          width = round((factor if expert_choice else layer.num_selected) * args.hidden_dim)
          if width not in dense_ms:  # the dense FFNs of the same active FLOPs, once per width
            dense_ms[width] = {}
            for name, module in [
                ("dense", DenseFFN(width, activation=args.activation, dtype=dtype)),
                ("dense_ref", ReferenceDenseFFN(width, args.activation, dtype))]:
              add_row(dict(router=name, path="-", experts=0, group_size=0, width=width,
                           layer=None), module)
          add_row(dict(router=router, path=path if form is None else f"{path}:{form}",
                       experts=num_experts, width=width, layer=layer, form=form,
                       group_size=0 if path == "dropless"
                       else layer.resolved_group_size(args.tokens)), layer)
  states = [None] * len(rows)
  for i in range(args.repeats):
    for index, (row, run) in enumerate(zip(rows, runs)):
      peak.sample()
      seconds, states[index] = run(i)
      row["ms"] = min(row["ms"], 1e3 * seconds)
      if row["layer"] is None:
        dense_ms[row["width"]][row["router"]] = row["ms"]
  peak.sample(10)

  for row, state in zip(rows, states):
    layer, width = row.pop("layer"), row.pop("width")
    if layer is None:
      useful = modelled = 3 * 2 * n * args.model_dim * width * args.tokens
      row["dropped_fraction"] = 0.0
    else:
      stats = state["routing_stats"]["stats"][0]
      useful, modelled = model_flops(layer, row["path"].split(":")[0], row.pop("form"),
                                     args.tokens, args.model_dim, stats)
      row["dropped_fraction"] = float(stats["dropped_fraction"])
    row.update(useful_gflop=useful / 1e9,
               useful_of_peak=useful / (row["ms"] / 1e3) / peak.best,
               vs_dense=row["ms"] / dense_ms[width].get("dense", math.nan),
               vs_reference=row["ms"] / dense_ms[width].get("dense_ref", math.nan),
               xla_vs_model=row.pop("xla_flops") / modelled)
  print(f"\nAgainst the run's best matmul peak, {peak.best / 1e9:.1f} GFLOP/s:")
  for i, row in enumerate(rows):
    print_row(row, header=i == 0)
  return peak, rows, memory_table(args, dtype) if args.memory_tokens else []


def main():
  args = parse_args()
  peak, rows, memory = measure(args)
  write_result(args.out, "moe_layer forward+backward", args, peak, rows, memory=memory)
  print(f"\nT={args.tokens} M={args.model_dim} H={args.hidden_dim} cf={args.capacity_factor} "
        f"{args.dtype} on {jax.default_backend()}; JSON: {args.out}")


def memory_table(args, dtype):
  """Compiled temp memory (MB) of a forward+backward, topk router at the first E, per path,
  token count and group size (compile only): linear in tokens means no [T,S] blow-up."""
  num_experts = int(args.experts.split(",")[0])
  sizes = [None if s == "auto" else int(s) for s in args.group_sizes.split(",")]
  table = []
  print("\ntemp MB (topk, E={}):".format(num_experts))
  for tokens in map(int, args.memory_tokens.split(",")):
    x = jax.ShapeDtypeStruct((tokens, args.model_dim), dtype)
    for path in PATHS:
      for group_size in ([None] if path == "dropless" else sizes):
        layer = MoeLayer(num_experts=num_experts, expert_hidden_dim=args.hidden_dim,
                         router="topk", capacity_factor=args.capacity_factor,
                         group_size=group_size, dispatch_path=path,
                         activation=args.activation, dtype=dtype)
        step, params = forward_backward(layer, jnp.zeros(x.shape, x.dtype))
        compiled = step.lower(params, x, jax.random.key(0)).compile()
        table.append(dict(tokens=tokens, path=path,
                          group_size=0 if path == "dropless" else layer.resolved_group_size(tokens),
                          temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2 ** 20))
        print("  T={tokens:>6} {path:<9} S={group_size:<5} {temp_mb:9.1f}".format(**table[-1]),
              flush=True)
  return table


COLUMNS = [("router", "router", "<14", ""), ("path", "path", "<20", ""), ("experts", "E", ">3", ""),
           ("group_size", "S", ">5", ""), ("ms", "ms", ">8", ".1f"),
           ("useful_of_peak", "useful", ">7", ".1%"), ("vs_dense", "x dense", ">8", ".2f"),
           ("vs_reference", "x ref", ">6", ".2f"),
           ("xla_vs_model", "xla/model", ">9", ".2f"), ("temp_mb", "temp MB", ">8", ".0f"),
           ("dropped_fraction", "dropped", ">8", ".3f")]


def print_row(row, header):
  if header:
    print(" ".join(f"{title:{align}}" for _, title, align, _ in COLUMNS))
  print(" ".join(f"{row[name]:{align}{fmt}}" for name, _, align, fmt in COLUMNS), flush=True)


if __name__ == "__main__":
  main()
