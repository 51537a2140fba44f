"""The analysis notebooks run top to bottom with papermill on a tiny real sweep, draw their
figures, and export to HTML; and they are what notebooks/make_notebooks.py writes."""
import contextlib
import fcntl
import json
import os
import runpy
import subprocess
import sys

import nbformat
import papermill
import pytest

from configs import vit
from moe_jax import sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

# Members small enough to train in seconds, each with two MoE layers, two checkpoints and two
# evaluations (the routing notebook compares the first and last checkpoint).
TINY = {"model.num_layers": 2, "model.width": 32, "model.num_heads": 2, "model.moe.every": 1,
        "train.batch_size": 32, "train.num_steps": 10, "train.warmup_steps": 2,
        "train.log_every": 2, "train.eval_every": 5, "train.eval_max_batches": 1,
        "train.checkpoint_every": 5}


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name):
  """`name` in a directory all pytest-xdist workers of this session share (make test runs two),
  held under a lock: the first worker builds what the tests need there, the others find it."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # this session's, common to its workers
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield base / name


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
  """A 3-member router sweep (dense, switch, expert_choice) in the sweep runner's layout: the
  definition through moe_jax.sweep, sweep.json as run_sweep writes it, and each member trained
  in this process (a subprocess per member, as the runner does, costs a JAX start each).

  Built once per session (see shared_dir).
  """
  with shared_dir(tmp_path_factory, "notebook_sweep") as workdir:
    if not (workdir / "sweep.json").exists():  # written last: the sweep is complete
      path = workdir.parent / "notebook_sweep.py"
      path.write_text("def get_sweep():\n  return " + repr({
          "base": "configs/vit.py", "fixed": TINY,
          "grid": {"config_arg": ["dense", "switch", "expert_choice"]}}) + "\n")
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
  """Runs notebooks/<name> with papermill (a cell error raises) and exports it to HTML."""
  output = os.path.join(output_dir, name)
  papermill.execute_notebook(os.path.join(NOTEBOOKS, name), output, parameters=parameters,
                             kernel_name="python3", cwd=ROOT, progress_bar=False)
  subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--no-input", output],
                 check=True, capture_output=True)
  with open(output.replace(".ipynb", ".html")) as f:
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


def test_analyze_sweep(sweep_dir, tmp_path):
  notebook, html = execute("analyze_sweep.ipynb", tmp_path, sweep_dir=str(sweep_dir))
  # parameters, injected parameters, setup, summary, curves, scatter, drops, load heatmaps
  assert images(notebook) == [0, 0, 0, 0, 1, 1, 1, 1]
  text = "".join(output.get("text", "") for cell in code_cells(notebook)
                 for output in cell.outputs)
  assert "3 of 3 members finished" in text
  summary = shown(code_cells(notebook)[3])
  assert all(group in summary for group in ("dense", "switch", "expert_choice"))
  assert html.count("<img") == 4 and "sweep_table" not in html  # inputs left out


def test_routing_analysis(sweep_dir, tmp_path):
  notebook, html = execute("routing_analysis.ipynb", tmp_path,
                           run_dir=str(sweep_dir / "expert_choice"), num_batches=1)
  # parameters, injected, setup, load, entropy, specialization table, heatmaps, consistency,
  # coverage, transitions
  assert images(notebook) == [0, 0, 0, 1, 1, 0, 1, 0, 1, 1]
  consistency = shown(code_cells(notebook)[7])
  assert "topk_overlap" in consistency
  assert html.count("<img") == 5


def test_routing_analysis_refuses_a_dense_run(sweep_dir, tmp_path):
  with pytest.raises(papermill.PapermillExecutionError, match="dense model"):
    papermill.execute_notebook(os.path.join(NOTEBOOKS, "routing_analysis.ipynb"),
                               str(tmp_path / "dense.ipynb"),
                               parameters={"run_dir": str(sweep_dir / "dense")},
                               kernel_name="python3", cwd=ROOT, progress_bar=False)


def test_notebooks_are_what_the_generator_writes():
  generator = runpy.run_path(os.path.join(NOTEBOOKS, "make_notebooks.py"))
  for name, cells in generator["NOTEBOOKS"].items():
    with open(os.path.join(NOTEBOOKS, name)) as f:
      assert f.read() == nbformat.writes(generator["build"](cells)) + "\n", (
          f"notebooks/{name} differs from make_notebooks.py: run it")
