"""The analysis notebooks run top to bottom with papermill on a tiny real sweep, draw their
figures, and export to HTML; and they are what notebooks/make_notebooks.py writes."""
import base64
import html as htmllib
import json
import math
import os
import re
import runpy
import shutil
import struct

import nbformat
import papermill
import pytest
from scipy import stats

from configs import vit
from experiments import sweep as sweep_command
from moe_jax import analysis, compare, report, sweep, train
from tests.conftest import FAST_COMPILE, shared_dir


# Members small enough to train in seconds, each with two MoE layers, two checkpoints and two
# evaluations (the routing notebook compares the first and last checkpoint).
TINY = {"model.num_layers": 2, "model.width": 32, "model.num_heads": 2, "model.moe.every": 1,
        "train.batch_size": 32, "train.num_steps": 10, "train.warmup_steps": 2,
        "train.log_every": 2, "train.eval_every": 5, "train.eval_max_batches": 1,
        "train.checkpoint_every": 5}


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
  """A router sweep in the sweep runner's layout: dense and switch at seeds 0 and 1 (paired
  comparisons with intervals), expert_choice at seed 0 (one seed); the definition through
  moe_jax.sweep, sweep.json as run_sweep writes it, and each member trained in this process (a
  subprocess per member, as the runner does, costs a JAX start each).

  Built once per session (see shared_dir).
  """
  with shared_dir(tmp_path_factory, "notebook_sweep") as workdir:
    if not (workdir / "sweep.json").exists():  # written last: the sweep is complete
      path = workdir.parent / "notebook_sweep.py"
      path.write_text("def get_sweep():\n  return " + repr({
          "base": "configs/vit.py", "fixed": TINY,
          "members": [{"config_arg": "dense"}, {"config_arg": "switch"},
                      {"config_arg": "expert_choice"}, {"config_arg": "dense", "seed": 1},
                      {"config_arg": "switch", "seed": 1}]}) + "\n")
      definition = sweep.load_sweep(str(path))
      members = sweep.expand(definition, str(workdir))
      for member in members:
        overrides = dict(member["overrides"])
        config = vit.get_config(overrides.pop(sweep.CONFIG_ARG))
        config.update_from_flattened_dict({**definition["fixed"], **overrides})
        train.train_and_evaluate(config, str(workdir / member["name"]))
      (workdir / "sweep.json").write_text(
          json.dumps({"definition": definition, "members": members}))
  return workdir


def execute(name, output_dir, **parameters):
  """Runs notebooks/<name> (a cell error raises) and exports it to HTML."""
  output = os.path.join(output_dir, name)
  with open(report.execute_notebook(name, output, **parameters)) as f:
    html = f.read()
  return nbformat.read(output, as_version=4), html


def code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def shown(cell) -> str:
  """The text of the value a code cell displays (its last expression)."""
  return next(output["data"]["text/plain"] for output in cell.outputs
              if output.output_type == "execute_result")


def images(notebook):
  """The number of PNG figures each code cell shows, in order."""
  return [sum("image/png" in output.get("data", {}) for output in cell.outputs)
          for cell in code_cells(notebook)]


def visible(html: str) -> str:
  """The exported page's text as shown: styles, scripts and tags left out, entities decoded."""
  body = re.sub(r"<style.*?</style>|<script.*?</script>", "", html, flags=re.S)
  return htmllib.unescape(re.sub(r"<[^>]+>", "", body))


def significant_digits(number: str) -> int:
  """Significant digits as written: '0.0410' 3, '43200' 3, '2.23' 3, '1.50e-07' 3."""
  mantissa = number.lstrip("+-").split("e")[0]
  digits = mantissa.replace(".", "").lstrip("0")
  return len(digits if "." in mantissa else digits.rstrip("0")) or 1


def test_analyze_sweep(sweep_dir, tmp_path):
  notebook, html = execute("analyze_sweep.ipynb", tmp_path, sweep_dir=str(sweep_dir))
  # parameters, injected parameters, setup, sentences, table, domains and their heatmaps (none
  # here), curves, router entropy and confidence, quality against cost, drops, load heatmaps
  assert images(notebook) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
  # Everything shown is displayed: no stray prints, no warnings, no Out[n] values.
  assert {output.output_type for cell in code_cells(notebook) for output in cell.outputs} == {
      "display_data"}
  text = visible(html)
  assert "Out[" not in text and "<pre>" not in html and "sweep_table" not in html
  assert html.count("<img") == 5
  assert "5 of 5 members finished, in 3 groups; every group is compared with dense" in text
  assert "The sweep's data has no domain labels." in text

  # The sentences, switch against dense at seeds 0 and 1 computed here with scipy.
  table = analysis.sweep_table(sweep_dir)
  accuracy = table.set_index(["group", "seed"])["eval/accuracy"]
  switch, dense = accuracy["switch"][[0, 1]].to_numpy(), accuracy["dense"][[0, 1]].to_numpy()
  differences = switch - dense
  if differences.std() > 0:
    low, high = stats.ttest_rel(switch, dense).confidence_interval(0.95)
  else:  # the same difference at both seeds (accuracy on 32 images moves in steps of 1/32)
    low = high = differences[0]
  verdict = ("better" if low > 0 else "worse" if high < 0 else "no detectable difference")
  assert (f"switch vs dense: {compare.format_interval(differences.mean(), low, high, True)} "
          f"accuracy, 2 seeds, paired: {verdict}.") in text
  one_seed = accuracy["expert_choice"][0] - accuracy["dense"][0]
  assert (f"expert_choice vs dense: {compare.format_interval(one_seed, math.nan, math.nan, True)}"
          f" accuracy, 1 seed, paired: one seed: no interval.") in text
  definition = analysis.sweep_definition(sweep_dir)
  speeds = compare.speed_sentences(sweep.relative_speed(table, definition))
  # On a loaded machine every baseline member can run contended: then one line says so instead.
  assert all(sentence in text for sentence in speeds) if speeds else (
      "Speed is not compared" in text or "No speed for" in text)
  # The answer before the warnings, which are folded (closed) below it.
  assert all(warning in text for warning in sweep.contention_warnings(table))
  if analysis.report_warnings(table):
    assert html.count("<details><summary>Warnings: ") == 1
    assert text.index(speeds[-1]) < text.index("Warnings: ") < text.index("Comparison")
  else:
    assert "<details>" not in html
  # Two evaluations (steps 5 and 10): a table, not a curve of two dots.
  evals = analysis.group_loss_curves(table).query("split == 'eval'").set_index(["group", "step"])
  assert "Eval loss (cross-entropy; mean over seeds, lowest to highest seed in parentheses):" \
      in text
  assert (f"{compare.significant(evals.loc[('switch', 10), 'mean'])} "
          f"({compare.significant(evals.loc[('switch', 10), 'low'])} to "
          f"{compare.significant(evals.loc[('switch', 10), 'high'])})") in text

  # The table: one row per group, every number to at most 3 significant figures.
  cells = [cell.replace("\N{NO-BREAK SPACE}", " ") for cell in  # intervals do not wrap inside
           re.findall(r"<td>(.*?)</td>", html[html.index("<table"):html.index("</table>")])]
  numbers = re.findall(r"[-+]?\d[\d.]*(?:e[-+]\d+)?", " ".join(cells))
  assert numbers and max(map(significant_digits, numbers)) <= 3
  switch_accuracy = stats.t.interval(0.95, 1, loc=switch.mean(), scale=stats.sem(switch))
  assert compare.format_interval(switch.mean(), *switch_accuracy) in cells
  assert cells.count("baseline") == 3  # accuracy, loss and tokens/s of dense


def png_width(cell) -> int:
  """The width in pixels of the figure a code cell shows (its PNG's IHDR)."""
  png = next(output["data"]["image/png"] for output in cell.outputs
             if "image/png" in output.get("data", {}))
  return struct.unpack(">I", base64.b64decode(png)[16:20])[0]


def test_analyze_sweep_whose_members_all_ran_contended(sweep_dir, tmp_path):
  """The tiny sweep without expert_choice, its members' CPU shares rewritten to 0.95, 0.3,
  0.95, 0.3 (median 0.625: every member far from it, as on a loaded machine): the answer says in
  one line why speed is missing, and nothing empty is drawn."""
  workdir = tmp_path / "contended"
  members = json.loads((sweep_dir / "sweep.json").read_text())
  members["members"] = [member for member in members["members"]
                        if member["overrides"]["config_arg"] != "expert_choice"]
  for i, member in enumerate(members["members"]):
    shutil.copytree(sweep_dir / member["name"], workdir / member["name"],
                    ignore=shutil.ignore_patterns("checkpoints", "tb"))
    path = workdir / member["name"] / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**record, "cpu_share": 0.3 if i % 2 else 0.95}
                                       if "cpu_share" in record else record) + "\n"
                            for record in records))
  (workdir / "sweep.json").write_text(json.dumps(members))
  assert analysis.sweep_table(workdir).contended.all()

  notebook, html = execute("analyze_sweep.ipynb", tmp_path, sweep_dir=str(workdir))
  text = visible(html)
  assert ("Speed is not compared: all 4 finished members ran contended (their CPU share far "
          "from the sweep's median; warnings below), so their tokens/s measure the machine, not "
          "the router.") in text
  assert text.index("switch vs dense") < text.index("Speed is not compared") < text.index(
      "Warnings: 4 members ran contended") < text.index("Comparison")
  assert "runs at" not in text and "x dense" not in text  # no speed sentence, no speed column
  # Quality against training FLOPs alone, as wide as the one loss panel (no empty time panel).
  cells = code_cells(notebook)
  assert images(notebook) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
  assert png_width(cells[9]) == png_width(cells[7])
  assert ("Training time is not plotted: every member ran contended (see the warnings), so the "
          "times measure the machine, not the router.") in text


def test_sweep_command_reports(sweep_dir, capfd):
  """`experiments.sweep --report` (what `make run` does) on the finished tiny sweep."""
  definition = str(sweep_dir.parent / "notebook_sweep.py")
  assert sweep_command.main(["--sweep", definition, "--workdir", str(sweep_dir),
                             "--report"]) == 0
  captured = capfd.readouterr()  # file descriptors: the kernel's own output included
  # The kernel listens on IPC sockets: over TCP, ipykernel warns that it is unencrypted.
  assert "without encryption" not in captured.err
  printed = captured.out.splitlines()
  assert printed[0] == "5 of 5 members finished before; running 0, 1 at a time"
  assert printed[-2] == f"Report: {sweep_dir / 'report.html'}"
  assert re.fullmatch(r"Elapsed: \d+\.\d minutes", printed[-1])
  html = (sweep_dir / "report.html").read_text()
  assert html.count("<img") == 5 and "5 of 5 members finished" in html
  assert nbformat.read(sweep_dir / "report.ipynb", as_version=4).metadata.papermill.parameters \
      == {"sweep_dir": str(sweep_dir)}


def test_sweep_command_says_why_the_report_failed(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  definition = tmp_path / "broken_sweep.py"
  definition.write_text("def get_sweep():\n  return " + repr({
      # A member that fails as it trains (diverges): a config error would stop the sweep first.
      "base": "configs/vit.py", "fixed": TINY, "members": [{"train.learning_rate": 1e9}]}) + "\n")
  workdir = tmp_path / "runs"
  assert sweep_command.main(["--sweep", str(definition), "--workdir", str(workdir),
                             "--report"]) == 1
  printed = capsys.readouterr().out.splitlines()
  assert printed[-2] == (f"Report failed: ValueError: no member of {workdir} has finished yet "
                         f"(the executed notebook: {workdir / 'report.ipynb'})")
  assert re.fullmatch(r"Elapsed: \d+\.\d minutes", printed[-1])
  assert (workdir / "report.ipynb").exists()  # up to the failing cell, for a look


def test_routing_analysis(sweep_dir, tmp_path):
  notebook, html = execute("routing_analysis.ipynb", tmp_path,
                           run_dir=str(sweep_dir / "expert_choice"), num_batches=1)
  # parameters, injected, setup, load, entropy, load spread, specialization table, heatmaps,
  # domains (none here), saturation (its table and curve), coverage, transitions
  assert images(notebook) == [0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1]
  printed = "".join(o.get("text", "") for o in code_cells(notebook)[5].outputs)
  assert "collapsed: never" in printed  # 5 records of 2 steps, a balanced expert choice router
  domains = "".join(o.get("text", "") for o in code_cells(notebook)[8].outputs)
  assert domains == "the run's data has no domain labels\n"
  saturation = code_cells(notebook)[9].outputs
  assert "saturation" in "".join(o.get("data", {}).get("text/plain", "") for o in saturation)
  assert html.count("<img") == 7


def test_routing_analysis_refuses_a_dense_run(sweep_dir, tmp_path):
  with pytest.raises(papermill.PapermillExecutionError, match="dense model"):
    report.execute_notebook("routing_analysis.ipynb", str(tmp_path / "dense.ipynb"),
                            run_dir=str(sweep_dir / "dense"))


def test_notebooks_are_what_the_generator_writes():
  generator = runpy.run_path(os.path.join(report.NOTEBOOKS, "make_notebooks.py"))
  for name, cells in generator["NOTEBOOKS"].items():
    with open(os.path.join(report.NOTEBOOKS, name)) as f:
      assert f.read() == nbformat.writes(generator["build"](cells)) + "\n", (
          f"notebooks/{name} differs from make_notebooks.py: run it")
