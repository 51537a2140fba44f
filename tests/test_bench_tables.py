"""BENCHMARKS.md's generated tables (tools/bench_tables.py) on small hand-made benchmark files."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import bench_tables  # noqa: E402  (tools/ is not a package)

MACHINE = dict(processor="AMD EPYC", cpu_count=2, backend="cpu", jax="0.10.2", flax="0.12.8",
               ld_preload="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
               load_average=[2.04, 1.5, 1.25])


def result(rows, command="benchmarks/moe_layer.py --repeats 5", ld_preload=None, **extra):
  machine = MACHINE | ({} if ld_preload is None else dict(ld_preload=ld_preload))
  return dict(command=command, commit="abc1234", date="2026-12-06T18:01:59+00:00",
              machine=machine, config=dict(peak_size=2048, set=[]), peak_flops=5e11, rows=rows,
              **extra)


def layer(router, path, experts, ms, **values):
  return dict(router=router, path=path, experts=experts, group_size=128 if experts else 0,
              ms=ms, useful_of_peak=values.get("useful", 0.5), vs_dense=values.get("dense", 1.0),
              vs_reference=values.get("ref", 1.0), xla_vs_model=1.0, temp_mb=100.0,
              dropped_fraction=0.0)


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(bench_tables, "BENCH_DIR", tmp_path)

  def write(name, content):
    (tmp_path / f"{name}.json").write_text(json.dumps(content))
  return write


def test_command_is_wrapped_at_flags_and_names_the_allocator():
  long = result([], command="benchmarks/train_step.py --routers dense,topk --dispatch-paths "
                            "index,dropless --repeats 5 --set model.width=256")
  assert bench_tables.command(long) == (
      "    ./py benchmarks/train_step.py --routers dense,topk --dispatch-paths index,dropless \\\n"
      "        --repeats 5 --set model.width=256")
  assert bench_tables.command(result([], ld_preload="")) == (
      "    .venv/bin/python benchmarks/moe_layer.py --repeats 5")


def test_provenance_names_date_commit_machine_peak_and_load():
  assert bench_tables.provenance(result([])) == (
      "2026-12-06 18:01 UTC, commit abc1234: AMD EPYC, 2 cores, cpu, jax 0.10.2, flax 0.12.8, "
      "tcmalloc; matmul peak 500 GFLOP/s (2048^2 float32), the best sampled between the rows; "
      "load average 2.0, 1.5, 1.2 at the end of the run.")


def test_malloc_table_pairs_rows_and_divides_times(bench_dir):
  bench_dir("fast", result([layer("dense", "-", 0, 400.0), layer("topk", "index", 8, 600.0)]))
  bench_dir("slow", result([layer("topk", "index", 8, 750.0), layer("dense", "-", 0, 500.0)],
                           ld_preload=""))
  assert bench_tables.malloc_table("fast", "slow").endswith(
      "| router | path | E | ms, tcmalloc | ms, glibc | glibc / tcmalloc |\n"
      "|---|---|---|---|---|---|\n| dense | - | - | 400 | 500 | 1.25 |\n"
      "| topk | index | 8 | 600 | 750 | 1.25 |")


def train(width, dense_mfu, topk_mfu):
  rows = [dict(config="configs/vit.py:dense", path="-", ms=100.0, tokens_per_s=1000.0,
               mfu=dense_mfu, vs_dense=1.0),
          dict(config="configs/vit.py:topk", path="index", ms=110.0, tokens_per_s=900.0,
               mfu=topk_mfu, vs_dense=1.1),
          dict(config="configs/lm.py:dense", path="-", ms=50.0, tokens_per_s=2000.0,
               mfu=dense_mfu, vs_dense=1.0)]
  return result(rows) | dict(config=dict(peak_size=2048, set=[f"model.width={width}"]))


def test_targets_are_judged_from_the_files(bench_dir):
  bench_dir("moe_layer_topk_E", result([
      layer("dense", "-", 0, 400.0, useful=0.95),
      layer("topk", "index", 8, 600.0, useful=0.6, dense=1.5, ref=0.75),
      layer("topk", "dropless:chunks", 8, 500.0, useful=0.76, dense=1.25, ref=0.7),
      layer("topk", "index", 64, 660.0, dense=1.65, ref=0.85),
      layer("topk", "dropless:chunks", 64, 700.0, dense=1.75, ref=0.9)]))
  for width, dense_mfu, topk_mfu in [(128, 0.45, 0.40), (256, 0.55, 0.49), (384, 0.6, 0.52),
                                     (512, 0.65, 0.6)]:
    for name in (bench_tables.REFERENCE if width == 512 else [f"train_step_width{width}"]):
      bench_dir(name, train(width, dense_mfu, topk_mfu))
  memory = [dict(tokens=t, path=p, group_size=s, temp_mb=m) for t, p, s, m in [
      (4096, "index", 128, 100.0), (4096, "index", 1024, 100.0), (4096, "dropless", 0, 50.0),
      (16384, "index", 128, 410.0), (16384, "index", 1024, 410.0), (16384, "dropless", 0, 160.0)]]
  bench_dir("moe_layer_routers", result([], memory=memory))
  rows = bench_tables.targets_table().split("\n")[2:]
  assert [row.split(" | ")[1:] for row in rows] == [
      ["dropless:chunks: 76.0%; moe-jax's dense FFN 95.0%", "yes |"],
      ["E = 8, dropless:chunks: 0.70x the reference FFN, 1.25x moe-jax's; E = 64, index: 0.85x "
       "the reference FFN, 1.65x moe-jax's", "against the reference FFN yes; against moe-jax's, "
       "no |"],
      ["index 1.10x, dropless:chunks 1.40x", "index (the fastest at E = 64): yes |"],
      ["width 128: 40.0%-45.0%; width 256: 49.0%-55.0%; width 384: 52.0%-60.0%; width 512: "
       "60.0%-65.0%", "from width 384 up |"],
      ["index: 4.1x for 4x the tokens, the same at every S; dropless: 3.2x for 4x the tokens, "
       "the same at every S", "yes |"]]
