"""The GPU benchmark in one command: the dropless forms (tokamax among them) against the other
paths and the dense FFN, and the train step of a GPU-sized LM, in bfloat16, against the bf16
matmul peak measured in the same run.

Items, each run on its own (one that fails prints its error and the rest go on):
  peak       the best rate of a square bf16 matmul (moe_layer.MatmulPeak), sampled again between
             every timed step of the items below.
  layer      moe_layer.measure: topk (k = 2), E = 8 and 64, the einsum and index paths and every
             dropless form, with the dense FFN of the same active FLOPs, at the reference size
             (T = 8192, M = 512, H = 2048) and the large one (T = 65536, M = 1024, H = 4096; no
             ragged_dot there: XLA lowers it densely, which does not fit in memory).
  train      train_step.measure: configs/lm_gpu.py dense, topk on the index path and topk dropless
             (the backend's default form: tokamax on a GPU it supports), with MFU.
Budgeted for under 8 minutes on one H200, compilation included. Writes JSON (--out) and the
tables as Markdown for BENCHMARKS.md (the same path with .md).

  python benchmarks/gpu.py --out gpu.json     # on the GPU machine (BENCHMARKS.md, "GPU: tokamax")
  python benchmarks/gpu.py --smoke --out /tmp/gpu.json   # tiny sizes, any backend (the test's)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from benchmarks import moe_layer, train_step  # noqa: E402
from moe_jax import dispatch  # noqa: E402

# (name, moe_layer arguments, dropless forms) of the layer items.
SIZES = [("reference", ["--tokens", "8192", "--model-dim", "512", "--hidden-dim", "2048"],
          dispatch.DROPLESS_FORMS),
         ("large", ["--tokens", "65536", "--model-dim", "1024", "--hidden-dim", "4096"],
          tuple(f for f in dispatch.DROPLESS_FORMS if f != "ragged_dot"))]
SMOKE = ["--tokens", "64", "--model-dim", "16", "--hidden-dim", "32"]
SMOKE_LM = ["model.num_layers=2", "model.width=32", "model.num_heads=2", "model.mlp_dim=64",
            "train.batch_size=2", "data.seq_len=16", "model.moe.group_size=16"]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "gpu.json"))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, E = 4, one repetition: checks that every item runs")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per row")
  parser.add_argument("--peak-size", type=int, default=8192)
  return parser.parse_args(argv)


def layer_args(args, size_args, forms):
  """moe_layer's arguments for one size: topk, every path and the given dropless forms."""
  return moe_layer.parse_args(
      (SMOKE if args.smoke else size_args)
      + ["--experts", "4" if args.smoke else "8,64", "--routers", "topk",
         "--paths", "einsum,index,dropless", "--dropless-forms", ",".join(forms),
         "--group-sizes", "auto", "--dtype", "bfloat16", "--memory-tokens", "",
         "--repeats", str(repeats(args)), "--peak-size", str(args.peak_size)])


def repeats(args) -> int:
  return 1 if args.smoke else args.repeats


def train_args(args):
  return train_step.parse_args(
      ["--models", "lm_gpu", "--routers", "dense,topk", "--dispatch-paths", "index,dropless",
       "--dtype", "bfloat16", "--repeats", str(repeats(args)), "--peak-size",
       str(args.peak_size)]
      + [f"--set={item}" for item in (SMOKE_LM if args.smoke else [])])


LAYER_COLUMNS = [("size", "size"), ("router", "router"), ("path", "path"), ("experts", "E"),
                 ("ms", "ms"), ("useful_of_peak", "useful / peak"), ("vs_dense", "x dense"),
                 ("temp_mb", "temp MB"), ("dropped_fraction", "dropped")]
TRAIN_COLUMNS = [("config", "config"), ("path", "path"), ("ms", "ms"),
                 ("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("vs_dense", "x dense")]
FORMATS = {"ms": "{:.1f}", "useful_of_peak": "{:.1%}", "vs_dense": "{:.2f}", "temp_mb": "{:.0f}",
           "dropped_fraction": "{:.3f}", "tokens_per_s": "{:,.0f}", "mfu": "{:.1%}"}


def markdown(rows, columns) -> str:
  """rows as a Markdown table of `columns` (key, title)."""
  lines = ["| " + " | ".join(title for _, title in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(FORMATS.get(key, "{}").format(row[key])
                                   for key, _ in columns) + " |")
  return "\n".join(lines)


def main():
  args = parse_args()
  start = time.perf_counter()
  peak = moe_layer.MatmulPeak(64 if args.smoke else args.peak_size, jnp.bfloat16)
  result = dict(benchmark="gpu", machine=moe_layer.machine_info(), config=vars(args),
                layer=[], train=[], errors={})

  def item(name, run):
    print(f"\n== {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    try:
      return run()
    except Exception:  # one item's failure must not end the run
      result["errors"][name] = traceback.format_exc()
      print(result["errors"][name], flush=True)
      return None

  item("peak", lambda: print(f"bf16 matmul peak: {peak.sample(20) / 1e12:.1f} TFLOP/s"))
  for size, size_args, forms in SIZES[:1] if args.smoke else SIZES:
    measured = item(f"layer {size}",
                    lambda: moe_layer.measure(layer_args(args, size_args, forms), peak))
    for row in measured[1] if measured else []:
      result["layer"].append(row | dict(size=size))
  result["train"] = item("train step", lambda: train_step.measure(train_args(args), peak)) or []
  peak.sample(10)
  result.update(peak_flops=peak.best, seconds=time.perf_counter() - start)
  tables = (f"bf16 matmul peak: {peak.best / 1e12:.1f} TFLOP/s; {jax.devices()[0].device_kind}, "
            f"jax {jax.__version__}, {result['seconds']:.0f} s in all\n\n"
            f"{markdown(result['layer'], LAYER_COLUMNS)}\n\n"
            f"{markdown(result['train'], TRAIN_COLUMNS)}\n")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(tables)
  print(f"\n{tables}\nJSON: {args.out}; failed items: {', '.join(result['errors']) or 'none'}")


if __name__ == "__main__":
  main()
