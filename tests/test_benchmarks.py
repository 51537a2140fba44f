"""Smoke tests of benchmarks/: both scripts run end to end on tiny sizes and count FLOPs right."""
import json
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from benchmarks import moe_layer, train_step
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
  config = train_step.with_overrides(train_step.common.vit("switch"), "switch",
                                     ["model.dtype=bfloat16"])
  assert config.model.dtype == "bfloat16"  # what main prepends to --set


def test_train_step_benchmark_overrides_and_skips(tmp_path, monkeypatch, capsys):
  out = tmp_path / "train_step.json"
  run_main(train_step, monkeypatch, "--models", "vit,lm", "--routers", "switch,expert_choice",
           "--dispatch-paths", "dropless", "--repeats", "1", "--peak-size", "64",
           "--set", "model.width=32", "--set", "model.mlp_dim=64", "--set", "train.batch_size=4",
           "--set", "data.seq_len=16", "--out", str(out))
  rows = json.loads(out.read_text())["rows"]
  # expert_choice has no dropless form (ViT: no row); the LM refuses it (skipped, said so).
  assert [(r["config"], r["path"]) for r in rows] == [("configs/vit.py:switch", "dropless"),
                                                       ("configs/lm.py:switch", "dropless")]
  assert "configs/lm.py:expert_choice skipped" in capsys.readouterr().out
  assert [r["tokens_per_step"] for r in rows] == [4 * 50, 4 * 16]  # 49 patches + class token
  with pytest.raises(ValueError, match=r"^--set 'model.widht=8': model.widht is not a config "
                                       r"field$"):
    train_step.with_overrides(train_step.common.vit("switch"), "switch", ["model.widht=8"])


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
