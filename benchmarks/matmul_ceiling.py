"""The MFU ceiling of a model's shapes on this machine: its matmuls alone, forward+backward.

For configs/vit.py:dense and configs/lm.py:dense (after --set overrides), times only the matmuls
that benchmarks/train_step.py counts as model FLOPs, at the train step's shapes: per block the
q, k, v and out projections and the FFN's two matmuls on the [B*T, M] tokens, and the attention
core (per head, scores [T, D] x [D, T] and weighted values [T, T] x [T, D]); the LM also its tied
head. Nothing else runs: no norms, softmax, activation, loss or optimizer; residual adds and the
heads' transposes only. Model FLOPs over this time and the peak is the MFU the full step would
reach if all other work were free. The patch embedding and classifier (0.2% of the ViT's FLOPs)
are left out of both the time and the FLOPs. Rows: the whole chain, then its parts alone.

  python benchmarks/matmul_ceiling.py
  python benchmarks/matmul_ceiling.py --set model.width=256 --set model.mlp_dim=1024 \
      --set model.num_heads=8

Prints a table and writes JSON (default benchmarks/results/matmul_ceiling.json).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from benchmarks.moe_layer import MatmulPeak, write_result  # noqa: E402
from benchmarks.train_step import data_info, time_interleaved, with_overrides  # noqa: E402
from moe_jax import models, train  # noqa: E402

PARTS = ("all", "projections+ffn", "attention core")


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="vit,lm")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. model.width=256 (repeatable)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--peak-size", type=int, default=2048)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "matmul_ceiling.json"))
  return parser.parse_args()


def matmul_chain(model, info, batch, part):
  """forward(params, x [B*T, M]) -> [B*T, M] (the LM's "all" and "projections+ffn": [B*T, V]
  logits), running only `part`'s matmuls of the dense model's blocks."""
  width, heads = model.width, model.num_heads
  length, vocab = train.tokens_per_example(model, info), info.get("vocab_size", 0)

  def to_heads(rows):  # [B*T, M] -> [B, N, T, D]
    return rows.reshape(batch, length, heads, width // heads).swapaxes(1, 2)

  def forward(params, x):
    for block in params["blocks"]:
      if part != "projections+ffn":
        q, k, v = (to_heads(x @ block[name] if part == "all" else x)
                   for name in ("query", "key", "value"))
        scores = jnp.einsum("bntd,bnsd->bnts", q, k)
        mixed = jnp.einsum("bnts,bnsd->bntd", scores, v).swapaxes(1, 2).reshape(x.shape)
        x = x + (mixed @ block["out"] if part == "all" else mixed)
      else:
        # An elementwise product, not a sum: XLA would fold x Wq + x Wk + x Wv into one matmul.
        q, k, v = (x @ block[name] for name in ("query", "key", "value"))
        x = x + (q * k * v) @ block["out"]
      if part != "attention core":
        x = x + (x @ block["wi"]) @ block["wo"]
    if vocab and part != "attention core":
      return x @ params["embedding"].T
    return x

  return forward


def forward_backward(forward, params, x):
  """(jitted (params, x, cotangent) -> (output, gradients of params and x), a random cotangent).
  The output is returned so that the last matmul runs, as the loss needs it in a train step; the
  cotangent is random because with all ones XLA turns the last matmuls' backward into
  reductions."""
  out = jax.eval_shape(forward, params, x)
  cotangent = jax.random.normal(jax.random.key(1), out.shape, out.dtype)

  @jax.jit
  def step(params, x, cotangent):
    out, backward = jax.vjp(forward, params, x)
    return out, backward(cotangent)

  return step, cotangent


def part_flops(model, info, part):
  """Model FLOPs per token of `part`'s forward: the train step's models.flop_counts, less the
  ViT's patch embedding and classifier (not in the chain)."""
  counts = models.flop_counts(model, info)
  head = counts["head_flops_per_token"] if "vocab_size" in info else 0
  matmuls = counts["active_flops_per_token"] + head
  core = model.num_layers * 4 * train.tokens_per_example(model, info) * model.width
  return {"all": matmuls, "projections+ffn": matmuls - core, "attention core": core}[part]


def setup(name, overrides):
  """(model config, data info, batch size B, params, x [B*T, M]) of configs/<name>.py:dense with
  --set overrides; params hold each block's float32 matrices."""
  config = with_overrides(importlib.import_module(f"configs.{name}").get_config("dense"),
                          "dense", overrides)
  model = config.model
  if model.activation == "swiglu":
    raise ValueError("model.activation='swiglu': the chain has the two FFN matmuls of 'gelu' "
                     "and 'relu' only")
  info = data_info(name, config)
  length = train.tokens_per_example(model, info)
  batch, vocab, width = config.train.batch_size, info.get("vocab_size", 0), model.width
  keys = iter(jax.random.split(jax.random.key(0), 6 * model.num_layers + 2))
  normal = lambda *shape: jax.random.normal(next(keys), shape) * 0.02
  params = {"blocks": [
      {name: normal(width, width) for name in ("query", "key", "value", "out")}
      | {"wi": normal(width, model.mlp_dim), "wo": normal(model.mlp_dim, width)}
      for _ in range(model.num_layers)]}
  if vocab:
    params["embedding"] = normal(vocab, width)
  return model, info, batch, params, normal(batch * length, width)


def main():
  args = parse_args()
  peak = MatmulPeak(args.peak_size, jnp.float32)
  rows, steps = [], []
  for name in args.models.split(","):
    model, info, batch, params, x = setup(name, args.set)
    for part in PARTS:
      step, cotangent = forward_backward(matmul_chain(model, info, batch, part), params, x)
      jax.block_until_ready(step(params, x, cotangent))

      def timed_step(step=step, params=params, x=x, cotangent=cotangent):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x, cotangent))
        return time.perf_counter() - start

      steps.append(timed_step)
      rows.append(dict(config=f"configs/{name}.py:dense", part=part,
                       model_flops_per_step=3 * part_flops(model, info, part) * len(x)))
  time_interleaved(rows, steps, peak, args.repeats)
  peak.sample(10)
  print(f"{'config':<22} {'part':<16} {'ms':>8} {'of peak':>8}")
  for row in rows:
    row["of_peak"] = row["model_flops_per_step"] / (row["ms"] / 1e3) / peak.best
    print("{config:<22} {part:<16} {ms:>8.1f} {of_peak:>8.1%}".format(**row))
  print(f"(against the run's best matmul peak, {peak.best / 1e9:.1f} GFLOP/s)")
  write_result(args.out, "matmul_ceiling", args, peak, rows)
  print(f"JSON: {args.out}")


if __name__ == "__main__":
  main()
