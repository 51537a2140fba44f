"""Reports: an analysis notebook of notebooks/ executed on a run or sweep, exported to HTML.

  write_sweep_report("runs/routers")   # runs/routers/report.ipynb and report.html

The notebook runs top to bottom with papermill (its parameters injected after the cell tagged
`parameters`; a failing cell raises papermill.PapermillExecutionError, and the executed notebook
up to that cell is still written). The HTML leaves the code and the In/Out prompts out: tables,
figures and text only.
"""
from __future__ import annotations

import os
import uuid

import jupyter_client
import jupyter_core.paths
import nbconvert
import nbformat
import papermill
import traitlets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


class IpcKernelManager(jupyter_client.AsyncKernelManager):
  """nbclient's kernel manager, with the kernel on local (IPC) sockets in the Jupyter runtime
  directory instead of localhost TCP ports, which other local users could read (ipykernel 7
  warns about them on every run)."""
  transport = traitlets.CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

  @traitlets.default("ip")
  def _socket_path_of_its_own(self) -> str:
    # jupyter_client's default, "kernel-ipc" in the working directory numbered -1, -2, ..., is
    # shared by kernels that start at once in other processes (two test workers, two reports):
    # each then reads the other's messages and fails on their signatures.
    runtime = jupyter_core.paths.jupyter_runtime_dir()
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    return os.path.join(runtime, f"kernel-{uuid.uuid4().hex[:12]}-ipc")  # short: a socket path


def execute_notebook(name: str, output: str, **parameters) -> str:
  """Runs notebooks/<name> into `output` (.ipynb) with `parameters`; returns the HTML's path.

  The notebook's working directory is the repository root, so relative run paths resolve as on
  the command line. The HTML is written next to `output` with the suffix .html.
  """
  papermill.execute_notebook(os.path.join(NOTEBOOKS, name), output, parameters=parameters,
                             kernel_name="python3", cwd=ROOT, progress_bar=False,
                             kernel_manager_class=IpcKernelManager)
  exporter = nbconvert.HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                                    exclude_output_prompt=True)
  html, _ = exporter.from_notebook_node(nbformat.read(output, as_version=4))
  html_path = os.path.splitext(output)[0] + ".html"
  with open(html_path, "w") as f:
    f.write(html)
  return html_path


def write_sweep_report(sweep_dir: str) -> str:
  """analyze_sweep.ipynb on the sweep in `sweep_dir`, as <sweep_dir>/report.{ipynb,html}.

  Returns the HTML's path.
  """
  sweep_dir = os.path.abspath(sweep_dir)
  return execute_notebook("analyze_sweep.ipynb", os.path.join(sweep_dir, "report.ipynb"),
                          sweep_dir=sweep_dir)
