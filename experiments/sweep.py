"""Run (or resume) a sweep of training runs and table their results.

  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers
  python -m experiments.sweep --sweep configs/sweeps/capacity.py --workdir runs/capacity \
      --parallel 2
  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers --dry-run

Every member trains in its own `python -m experiments.train` process, in
`<workdir>/<member name>`. Running the same command again skips finished members and resumes the
others. At the end `<workdir>/results.csv` holds one row per member and is printed as a table;
the exit code is 1 if a member failed (its error is in the table and in its status.json).
Ctrl-C or SIGTERM interrupts the running members (their checkpoints stay good) and writes
results.csv so far. The sweep file format is described in moe_jax/sweep.py.
"""
import argparse
import os
import shlex
import signal
import sys

from moe_jax import sweep


def _interrupt(signum, frame):
  """SIGTERM (a job scheduler's stop) stops the members like Ctrl-C does."""
  raise KeyboardInterrupt


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/routers.py")
  parser.add_argument("--workdir", required=True, help="directory of the sweep's runs")
  parser.add_argument("--parallel", type=int, default=1,
                      help="members trained at once (each uses every CPU core it can)")
  parser.add_argument("--dry-run", action="store_true",
                      help="list the members and their commands, run nothing")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    parser.error("--parallel must be >= 1")
  try:
    definition = sweep.load_sweep(args.sweep)
    members = sweep.expand(definition, args.workdir)
  except ValueError as error:
    sys.exit(f"Sweep error: {error}")

  if args.dry_run:
    print(f"{len(members)} members of {args.sweep} in {args.workdir} "
          f"(commands run in {sweep.ROOT}):")
    for member in members:
      status = sweep.member_status(os.path.join(args.workdir, member["name"]))
      print(f"{member['name']}  [{status}]\n  {shlex.join(member['command'])}")
    return 0

  try:
    results = sweep.run_sweep(definition, args.workdir, args.parallel)
  except KeyboardInterrupt:
    print(f"Interrupted; run the same command to resume. Results so far: "
          f"{os.path.join(args.workdir, 'results.csv')}")
    return 130
  print(sweep.format_results(results))
  print(f"Results: {os.path.join(args.workdir, 'results.csv')}")
  return int((results["status"] == "failed").any())


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, _interrupt)
  sys.exit(main())
