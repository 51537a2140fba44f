"""The sweep report's parts (moe_jax/analysis.py, notebooks/analyze_sweep.ipynb) on results
tables written here: the answer first (quality and speed, or why speed is missing), warnings
folded, the comparison and evaluation tables, and the choices that keep its plots readable (log
axes, markers dodged apart). tests/test_notebooks.py runs the report on a real sweep."""
import os

import jupyter_core.paths
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_jax import analysis, sweep
from moe_jax import report as report_lib

CONTENDED_WARNING = (
    "topk,seed=1 had a CPU share of 41% (the sweep's median: 96%; load average 3.9): other work "
    "on the machine slowed it, so its tokens/s and wall-clock time are left out of the "
    "comparisons.")


def language_model_sweep(cpu_share=(0.97, 0.96, np.nan, 0.95, 0.41, np.nan)):
  """A results table as collect_results makes it: dense and topk at two seeds (topk's seed 1
  contended at the default CPU shares), loss_free failed."""
  table = pd.DataFrame({
      "name": ["dense,seed=0", "topk,seed=0", "loss_free,seed=0", "dense,seed=1", "topk,seed=1",
               "loss_free,seed=1"],
      "group": ["dense", "topk", "loss_free"] * 2, "seed": [0, 0, 0, 1, 1, 1],
      "status": ["finished", "finished", "failed"] * 2,
      "eval/loss": [1.5412, 1.5103, np.nan, 1.5498, 1.5241, np.nan],
      "eval/accuracy": [0.52, 0.53, np.nan, 0.51, 0.52, np.nan],
      "eval/bits_per_byte": [2.2235, 2.1789, np.nan, 2.2359, 2.1988, np.nan],
      "tokens_per_s": [43210.2374, 38001.5, np.nan, 42987.1, 19500.0, np.nan],
      "cpu_share": list(cpu_share),
      "load_avg": [2.0, 2.1, np.nan, 2.0, 3.9, np.nan],
      "wall_seconds": [60.0, 66.0, np.nan, 61.0, 130.0, np.nan],
      "dropped_fraction": [np.nan, 0.12345, np.nan, np.nan, 0.1111, np.nan],
      "error": ["", "", "Config error: <bad>", "", "", "Config error: <bad>"]})
  table["contended"] = sweep.flag_contended(table)
  return table


def report(table):
  definition = {"baseline": None}
  summary, speed = sweep.summarize(table, definition), sweep.relative_speed(table, definition)
  return summary, speed, analysis.report_sentences(table, summary, speed, ["eval/bits_per_byte"])


QUALITY = ("topk vs dense: -0.0409 [-0.0885, 0.00680] bits per byte, 2 seeds, paired: no "
           "detectable difference.")


def test_report_table_and_sentences_of_a_language_model_sweep():
  table = language_model_sweep()
  summary, speed, sentences = report(table)
  assert analysis.quality_metrics(table) == ["eval/bits_per_byte"]  # loss: the same in nats
  assert analysis.quality_metrics(table.drop(columns="eval/bits_per_byte")) == [
      "eval/accuracy", "eval/loss"]

  cells = analysis.comparison_table(table, summary, speed, ["eval/bits_per_byte"])
  assert list(cells.index) == ["dense", "topk", "loss_free"]
  topk, dense = np.array([2.1789, 2.1988]), np.array([2.2235, 2.2359])
  low, high = stats.ttest_rel(topk, dense).confidence_interval(0.95)
  assert (topk - dense).mean() == pytest.approx(-0.04085)
  assert (low, high) == pytest.approx((-0.0885, 0.0068), abs=5e-5)
  assert cells.loc["topk", ("bits per byte", "vs dense")] == "-0.0409 [-0.0885, 0.00680]"
  assert cells.loc["topk", ("bits per byte", "verdict")] == "no detectable difference"
  assert cells.loc["dense", ("bits per byte", "mean [95% CI]")] == "2.23 [2.15, 2.31]"
  assert cells.loc["dense", ("bits per byte", "vs dense")] == "baseline"
  # topk's seed 1 ran beside other work: its speed is left out, so one seed is compared.
  assert cells.loc["dense", ("tokens/s", "mean")] == "43100"
  assert cells.loc["topk", ("tokens/s", "mean")] == "38000"
  assert cells.loc["topk", ("tokens/s", "x dense")] == "0.879x"  # 38001.5 / 43210.2374
  assert cells.loc["topk", ("tokens/s", "verdict")] == "one seed: no interval"
  assert cells.loc["topk", ("", "dropped")] == "0.117"
  assert cells.loc["dense", ("", "dropped")] == "-"
  assert list(cells.loc["loss_free"]) == ["0", "-", "-", "-", "-", "-", "-", "-"]

  # The answer first; the contended and failed members only in the warnings, folded.
  assert sentences == [
      "4 of 6 members finished, in 2 groups; every group is compared with **dense**, with 95% "
      "intervals over seeds, paired by seed.",
      QUALITY, "topk runs at 0.879x dense's tokens/s, 1 seed, paired: one seed: no interval."]
  assert analysis.report_warnings(table) == (
      "<details><summary>Warnings: 1 member ran contended, 2 did not finish</summary><ul>"
      f"<li>{CONTENDED_WARNING.replace(chr(39), '&#x27;')}</li>"
      "<li>Not finished: <code>loss_free,seed=0</code> (failed: <code>Config error: &lt;bad&gt;"
      "</code>)</li>"
      "<li>Not finished: <code>loss_free,seed=1</code> (failed: <code>Config error: &lt;bad&gt;"
      "</code>)</li></ul></details>")


def test_the_report_says_in_one_line_why_speed_is_missing():
  # Every finished member contended (half far below the median share, half far above it).
  table = language_model_sweep(cpu_share=(0.3, 0.95, np.nan, 0.95, 0.3, np.nan))
  assert table.contended.tolist() == [True, True, False, True, True, False]
  _, _, sentences = report(table)
  assert sentences[1:] == [
      QUALITY, "Speed is not compared: all 4 finished members ran contended (their CPU share "
      "far from the sweep's median; warnings below), so their tokens/s measure the machine, "
      "not the router."]
  assert analysis.report_warnings(table).startswith(
      "<details><summary>Warnings: 4 members ran contended, 2 did not finish</summary>")
  # Only the baseline's members contended, or only topk's.
  _, _, sentences = report(language_model_sweep().assign(contended=[True, False, False] * 2))
  assert sentences[1:] == [QUALITY, "Speed is not compared: every member of the baseline dense "
                                    "ran contended (warnings below)."]
  _, _, sentences = report(language_model_sweep().assign(contended=[False, True, False] * 2))
  assert sentences[1:] == [QUALITY, "No speed for topk: its members all ran contended (warnings "
                                    "below)."]
  # Runs that logged no tokens/s.
  _, _, sentences = report(language_model_sweep(cpu_share=[0.95] * 6).assign(
      tokens_per_s=np.nan))
  assert sentences[1:] == [QUALITY, "Speed is not compared: no finished member logged its "
                                    "tokens/s."]
  # Nothing to warn about: no fold.
  quiet = language_model_sweep(cpu_share=[0.95] * 6).iloc[[0, 1, 3, 4]]
  assert analysis.report_warnings(quiet) == ""


def test_evaluations_too_few_to_draw_are_a_table():
  curves = pd.DataFrame({"group": ["dense", "dense", "topk", "topk", "topk"],
                         "split": ["train", "eval", "eval", "eval", "train"],
                         "step": [10, 40, 20, 40, 10], "seeds": [3, 3, 1, 3, 3],
                         "mean": [3.1, 2.9812, 3.2, 2.9901, 3.0],
                         "low": [3.0, 2.95, 3.2, 2.96, 2.9], "high": [3.2, 3.01, 3.2, 3.05, 3.1]})
  table = analysis.eval_table(curves)
  assert list(table.index) == ["dense", "topk"] and list(table.columns) == ["step 20", "step 40"]
  assert table.to_numpy().tolist() == [["-", "2.98 (2.95 to 3.01)"],
                                       ["3.20", "2.99 (2.96 to 3.05)"]]


def test_log_axes_where_values_span_decades_and_markers_dodged_apart():
  assert analysis.spans_decades([0.002, 0.03, np.nan])
  assert not analysis.spans_decades([0.2, 0.03])  # a factor of 6.7
  assert not analysis.spans_decades([0.0, 0.5])  # no log axis holds 0
  assert not analysis.spans_decades([np.nan])
  # Two groups at 9.51 and 9.52 TFLOP: apart on an axis fitted to them, so nobody moves.
  assert analysis.dodge([9.51e12, 9.52e12], spacing=8).tolist() == [0, 0]
  # Equal values (or within 2% of the span) sit side by side, centred on their value.
  assert analysis.dodge([5.0, 5.0, 5.0], spacing=8).tolist() == [-8, 0, 8]
  # Two clusters, each in its values' order: 1 and 1.5, 99 and 100 (2% of the span: 1.98).
  assert analysis.dodge([1.0, 100.0, 1.5, 99.0], spacing=6).tolist() == [-3, 3, 3, -3]


def test_each_report_kernel_has_sockets_of_its_own():
  """Kernels started at once by two processes (two test workers, two reports) once shared the
  socket files kernel-ipc-1, -2, ... of their working directory and read each other's messages
  ("Invalid Signature")."""
  first, second = (report_lib.IpcKernelManager(kernel_name="python3") for _ in range(2))
  assert first.transport == "ipc" and first.ip != second.ip
  assert os.path.dirname(first.ip) == jupyter_core.paths.jupyter_runtime_dir()
