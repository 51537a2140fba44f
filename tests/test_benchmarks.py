"""Smoke tests of benchmarks/: the scripts run end to end on tiny sizes and count FLOPs right."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from benchmarks import matmul_ceiling, moe_layer, train_step
from moe_jax.layers import DenseFFN


def run_main(module, monkeypatch, *args):
  monkeypatch.setattr(sys, "argv", [module.__file__, *args])
  module.main()


def test_moe_layer_benchmark_rows_and_flop_counts(tmp_path, monkeypatch):
  out = tmp_path / "moe_layer.json"
  run_main(moe_layer, monkeypatch, "--tokens", "64", "--model-dim", "16", "--hidden-dim", "32",
           "--experts", "4", "--routers", "topk", "--group-sizes", "auto", "--repeats", "1",
           "--peak-size", "64", "--memory-tokens", "64", "--out", str(out))
  result = json.loads(out.read_text())
  rows = {(r["router"], r["path"]): r for r in result["rows"]}
  assert set(rows) == {("dense", "-"), ("dense_ref", "-"), ("topk", "einsum"), ("topk", "index"),
                       ("topk", "dropless:chunks")}
  # Forward+backward = 3 x forward; gelu MLP = 2 matmuls of 2 M H FLOPs per row.
  # Dense of width k H = 64 over 64 tokens; dropless keeps all 2 x 64 (token, choice) pairs.
  assert rows["dense", "-"]["useful_gflop"] == pytest.approx(3 * 2 * 2 * 16 * 64 * 64 / 1e9)
  assert rows["dense_ref", "-"]["useful_gflop"] == rows["dense", "-"]["useful_gflop"]
  for row in rows.values():  # both ratios are times over the two dense rows' times
    assert row["vs_dense"] == pytest.approx(row["ms"] / rows["dense", "-"]["ms"])
    assert row["vs_reference"] == pytest.approx(row["ms"] / rows["dense_ref", "-"]["ms"])
  assert rows["topk", "dropless:chunks"]["useful_gflop"] == pytest.approx(
      3 * 2 * 2 * 16 * 32 * 128 / 1e9)
  assert rows["topk", "dropless:chunks"]["dropped_fraction"] == 0.0
  assert all(r["ms"] > 0 and r["useful_of_peak"] > 0 for r in result["rows"])
  assert [m["path"] for m in result["memory"]] == ["einsum", "index", "dropless"]
  assert "ld_preload" in result["machine"]
  assert result["command"] == (f"{os.path.relpath(moe_layer.__file__)} --tokens 64 --model-dim 16 "
                               "--hidden-dim 32 --experts 4 --routers topk --group-sizes auto "
                               f"--repeats 1 --peak-size 64 --memory-tokens 64 --out {out}")
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
  assert result["commit"].rstrip("+") == head.stdout.strip()


def test_bfloat16_runs_and_peaks_in_bfloat16(tmp_path, monkeypatch, capsys):
  out = tmp_path / "moe_layer.json"
  run_main(moe_layer, monkeypatch, "--tokens", "64", "--model-dim", "16", "--hidden-dim", "32",
           "--experts", "4", "--routers", "switch", "--paths", "index", "--group-sizes", "32",
           "--dtype", "bfloat16", "--repeats", "1", "--peak-size", "64", "--memory-tokens", "",
           "--out", str(out))
  assert "matmul peak (64^2 bfloat16)" in capsys.readouterr().out
  assert json.loads(out.read_text())["config"]["dtype"] == "bfloat16"
  peak = moe_layer.MatmulPeak(8, jax.numpy.bfloat16)
  assert peak.a.dtype == jax.numpy.bfloat16 and peak.sample() > 0
  out = tmp_path / "train_step.json"
  run_main(train_step, monkeypatch, "--models", "vit", "--routers", "switch", "--dispatch-paths",
           "index", "--repeats", "1", "--peak-size", "64", "--dtype", "bfloat16",
           "--set", "model.width=32", "--set", "model.mlp_dim=64", "--set", "train.batch_size=4",
           "--out", str(out))
  assert "matmul peak (64^2 bfloat16)" in capsys.readouterr().out
  result = json.loads(out.read_text())
  assert result["config"]["dtype"] == "bfloat16"
  assert [r["config"] for r in result["rows"]] == ["configs/vit.py:switch"]
  # By hand, per token (M = 32, T = 50, 4 layers, switch MoE in layers 1 and 3, 8 experts of
  # H = 64): attention 4 (8 M^2 + 4 T M), dense FFNs 2 (4 M 64), MoE 2 (2 M 8 + 4 M 64); outside
  # the blocks, (49 patches x 2 x 16 pixels x M + the classifier's 2 M 10) / T.
  per_token = 4 * (8 * 32**2 + 4 * 50 * 32) + 2 * 4 * 32 * 64 + 2 * (2 * 32 * 8 + 4 * 32 * 64)
  per_token += (49 * 2 * 16 * 32 + 2 * 32 * 10) / 50
  assert result["rows"][0]["model_flops_per_step"] == pytest.approx(3 * 4 * 50 * per_token)
  config = train_step.with_overrides(train_step.common.vit("switch"), "switch",
                                     ["model.dtype=bfloat16"])
  assert config.model.dtype == "bfloat16"  # what main prepends to --set


def test_train_step_benchmark_overrides_and_skips(tmp_path, monkeypatch, capsys):
  out = tmp_path / "train_step.json"
  run_main(train_step, monkeypatch, "--models", "vit,lm", "--routers", "switch,expert_choice,mod",
           "--dispatch-paths", "dropless", "--repeats", "1", "--peak-size", "64",
           "--set", "model.width=32", "--set", "model.mlp_dim=64", "--set", "train.batch_size=4",
           "--set", "data.seq_len=16", "--out", str(out))
  rows = json.loads(out.read_text())["rows"]
  # expert_choice has no dropless form (ViT: no row); the LM refuses it (skipped, said so);
  # Mixture-of-Depths has no MoE layer, so no dispatch path.
  assert [(r["config"], r["path"]) for r in rows] == [
      ("configs/vit.py:switch", "dropless"), ("configs/vit.py:mod", "-"),
      ("configs/lm.py:switch", "dropless"), ("configs/lm.py:mod", "-")]
  assert "configs/lm.py:expert_choice skipped" in capsys.readouterr().out
  assert [r["tokens_per_step"] for r in rows] == [4 * 50] * 2 + [4 * 16] * 2  # 49 patches + cls
  with pytest.raises(ValueError, match=r"^--set 'model.widht=8': model.widht is not a config "
                                       r"field$"):
    train_step.with_overrides(train_step.common.vit("switch"), "switch", ["model.widht=8"])


def test_matmul_ceiling_rows_and_flop_counts(tmp_path, monkeypatch):
  out = tmp_path / "matmul_ceiling.json"
  run_main(matmul_ceiling, monkeypatch, "--repeats", "1", "--peak-size", "64",
           "--set", "model.width=32", "--set", "model.mlp_dim=64", "--set", "train.batch_size=4",
           "--set", "data.seq_len=16", "--out", str(out))
  rows = {(r["config"], r["part"]): r for r in json.loads(out.read_text())["rows"]}
  # By hand, per token (4 layers, M = 32, mlp 64): projections and FFN 4 (8 M^2 + 4 M 64), the
  # LM's tied head 2 x 256 M; attention core 4 (4 T M), T = 50 (ViT) or 16 (LM).
  for model, tokens, head in (("vit", 50, 0), ("lm", 16, 2 * 256 * 32)):
    matmuls, core = 4 * (8 * 32**2 + 4 * 32 * 64) + head, 4 * 4 * tokens * 32
    for part, flops in (("all", matmuls + core), ("projections+ffn", matmuls),
                        ("attention core", core)):
      row = rows[f"configs/{model}.py:dense", part]
      assert row["model_flops_per_step"] == 3 * 4 * tokens * flops
      assert row["ms"] > 0 and row["of_peak"] > 0


@pytest.mark.parametrize("name", ["vit", "lm"])
def test_matmul_ceiling_runs_the_matmuls_the_train_step_counts(name):
  # At the default config's sizes, XLA's FLOP count of the chain's forward+backward is its model
  # FLOPs plus the residual adds (0.1% at width 128): no matmul is left out or folded away.
  model, info, batch, params, x = matmul_ceiling.setup(name, [])
  step, cotangent = matmul_ceiling.forward_backward(
      matmul_ceiling.matmul_chain(model, info, batch, "all"), params, x)
  xla_flops = step.lower(params, x, cotangent).compile().cost_analysis()["flops"]
  assert xla_flops == pytest.approx(3 * matmul_ceiling.part_flops(model, info, "all") * len(x),
                                    rel=0.002)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_reference_dense_ffn_computes_what_dense_ffn_computes(activation):
  x = jax.random.normal(jax.random.key(0), (64, 16))
  ours = nn.meta.unbox(DenseFFN(32, activation).init(jax.random.key(1), x))
  kernels = ours["params"]["mlp"]
  names = ["wi_gate", "wi_up", "wo"] if activation == "swiglu" else ["wi", "wo"]
  reference = {"params": {f"DenseGeneral_{i}": {"kernel": kernels[name]}
                          for i, name in enumerate(names)}}
  np.testing.assert_allclose(
      moe_layer.ReferenceDenseFFN(32, activation).apply(reference, x),
      DenseFFN(32, activation).apply(ours, x), rtol=1e-5, atol=1e-6)


def test_gpu_benchmark_runs_every_item_and_fails_soft(tmp_path, monkeypatch, capsys):
  # moe_layer.measure and train_step.measure are tested above; here what gpu.py asks of them,
  # its tables, and that a failing item is reported while the others run.
  from benchmarks import gpu
  asked = []

  def layer(args, peak):
    asked.append(args)
    return peak, [dict(router="topk", path=f"dropless:{form}", experts=4, ms=1.0,
                       useful_of_peak=0.5, vs_dense=1.5, temp_mb=1.0, dropped_fraction=0.0)
                  for form in args.dropless_forms.split(",")], []

  def train(args, peak):
    raise RuntimeError(f"out of memory in {args.models}")

  monkeypatch.setattr(moe_layer, "measure", layer)
  monkeypatch.setattr(train_step, "measure", train)
  out = tmp_path / "gpu.json"
  run_main(gpu, monkeypatch, "--smoke", "--out", str(out))
  assert [(a.tokens, a.experts, a.dtype, a.routers) for a in asked] == [
      (64, "4", "bfloat16", "topk")]
  result = json.loads(out.read_text())
  assert [r["path"] for r in result["layer"]] == [
      "dropless:ragged_dot", "dropless:chunks", "dropless:blocks", "dropless:tokamax"]
  assert list(result["errors"]) == ["train step"]
  assert "RuntimeError: out of memory in lm_gpu" in result["errors"]["train step"]
  table = (tmp_path / "gpu.md").read_text()
  assert "| reference | topk | dropless:tokamax | 4 | 1.0 | 50.0% | 1.50 | 1 | 0.000 |" in table
  assert "failed items: train step" in capsys.readouterr().out
  # The GPU run: both sizes, E = 8 and 64; the large one without ragged_dot (dense: no memory).
  args = gpu.parse_args([])
  assert [(gpu.layer_args(args, size_args, forms).tokens,
           gpu.layer_args(args, size_args, forms).experts) for _, size_args, forms in gpu.SIZES
          ] == [(8192, "8,64"), (65536, "8,64")]
  assert "ragged_dot" not in gpu.SIZES[1][2] and "tokamax" in gpu.SIZES[1][2]
  assert gpu.train_args(args).models == "lm_gpu"
