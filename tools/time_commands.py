"""Times make run, test and train from a fresh clone; the docs' times are generated from it.

  ./py tools/time_commands.py run test    # writes results/commands.json (both entries)
  ./py tools/time_commands.py test        # re-times make test, keeps the other entries
  ./py tools/time_commands.py train       # make train (docs/TRAINING.md)

Each command runs in a fresh `git clone` of this repository's HEAD in a temporary folder, as a
new user would run it (Debian packages installed, pip's cache as this machine has it), timed
wall-clock. The float32 2048^2 matmul peak (benchmarks/moe_layer.py's MatmulPeak, the best of 30)
is measured right before and right after (the file also keeps the load average before, which
counts what ran just before). From make test's output it keeps pytest's count of passed tests
and its own time. tools/results_tables.py renders results/commands.json into the README's
`commands` block and docs/TRAINING.md's `train-command` block.
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.moe_layer import processor_name  # noqa: E402

COMMANDS = ROOT / "results" / "commands.json"
PEAK = ("from benchmarks.moe_layer import MatmulPeak; "
        "print(MatmulPeak(2048).sample(30) / 1e9)")


def peak_gflops() -> float:
  """The float32 2048^2 matmul peak now, in this checkout's ./py (tcmalloc, as make runs)."""
  return float(subprocess.run([str(ROOT / "py"), "-c", PEAK], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout)


def time_make(target: str) -> dict:
  """Runs `make <target>` in a fresh clone of HEAD; its output goes to stdout as it comes."""
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
  entry = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=commit,
               processor=processor_name(), cpu_count=os.cpu_count(),
               load_average_before=[round(x, 2) for x in os.getloadavg()],
               peak_gflops_before=round(peak_gflops(), 1))
  with tempfile.TemporaryDirectory() as folder:
    clone = pathlib.Path(folder) / "moe-jax"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    start, lines = time.monotonic(), []
    process = subprocess.Popen(["make", target], cwd=clone, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
      sys.stdout.write(line)
      lines.append(line)
    entry["seconds"] = round(time.monotonic() - start, 1)
    if process.wait():
      raise SystemExit(f"make {target} failed (exit {process.returncode}); nothing written")
  entry["peak_gflops_after"] = round(peak_gflops(), 1)
  return entry | pytest_summary("".join(lines[-5:]))


def pytest_summary(output: str) -> dict:
  """{passed, pytest_seconds} from pytest's last line in output, else {}."""
  summary = re.search(r"(\d+) passed\b.* in ([\d.]+)s", output)
  return dict(passed=int(summary[1]), pytest_seconds=float(summary[2])) if summary else {}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("targets", nargs="+", choices=("run", "test", "train"))
  args = parser.parse_args(argv)
  entries = json.loads(COMMANDS.read_text()) if COMMANDS.exists() else {}
  for target in args.targets:
    entries[target] = time_make(target)
    COMMANDS.write_text(json.dumps(entries, indent=1) + "\n")
  print(f"{COMMANDS.relative_to(ROOT)}: " + "; ".join(
      f"make {t}: {e['seconds']:.0f} s" for t, e in entries.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
