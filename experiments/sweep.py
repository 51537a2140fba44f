"""Run (or resume) a sweep of training runs and table their results.

  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers
  python -m experiments.sweep --sweep configs/sweeps/capacity.py --workdir runs/capacity \
      --parallel 2
  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers --dry-run
  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers --report
  python -m experiments.sweep --sweep configs/sweeps/capacity.py --workdir runs/cap5 --seeds 5

Every member trains in its own `python -m experiments.train` process, in
`<workdir>/<member name>`. Running the same command again skips finished members and resumes the
others. At the end `<workdir>/results.csv` holds one row per member and is printed as a table;
the exit code is 1 if a member failed (its error is in the table and in its status.json), and a
warning names each member that other work on the machine slowed (contended: moe_jax/sweep.py).
`<workdir>/summary.csv` then compares every group with the sweep's baseline group, pairing
members by seed (mean, 95% intervals, verdicts: moe_jax/compare.py), and is printed too.
With --report, notebooks/analyze_sweep.ipynb then runs on the sweep and is exported to
`<workdir>/report.html` (figures and tables, no code; the executed notebook is report.ipynb).
Ctrl-C or SIGTERM interrupts the running members (their checkpoints stay good) and writes
results.csv so far; if the runner dies otherwise (SIGKILL), Linux stops its members. A member
that another live process still trains is waited for, never run twice. The last line printed is
the sweep's elapsed time. Every member's config is checked before any member starts: a member
that would stop with a config error stops the whole sweep, in one line naming it and the field.
--dry-run checks every member's config the same way (exit 1 and one line per member that would
not start). The sweep file format: moe_jax/sweep.py.
"""
import argparse
import os
import shlex
import sys
import time

import papermill

from moe_jax import compare, report, runlock, sweep


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/routers.py")
  parser.add_argument("--workdir", required=True, help="directory of the sweep's runs")
  parser.add_argument("--parallel", type=int, default=1,
                      help="members trained at once (each uses every CPU core it can)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="train every member at seeds 0..N-1 instead of the sweep file's seeds")
  parser.add_argument("--dry-run", action="store_true",
                      help="list the members and their commands and check every member's config "
                           "as a real start would; run nothing")
  parser.add_argument("--report", action="store_true",
                      help="then execute notebooks/analyze_sweep.ipynb into <workdir>/report.html")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    parser.error("--parallel must be >= 1")
  if args.seeds is not None and args.seeds < 1:
    parser.error("--seeds must be >= 1")
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    sys.exit(f"Sweep error: --workdir={args.workdir} is a file, not a directory")
  try:
    definition = sweep.load_sweep(args.sweep)
    if args.seeds is not None:
      definition["seeds"] = list(range(args.seeds))
    members = sweep.expand(definition, args.workdir)
  except ValueError as error:
    sys.exit(f"Sweep error: {error}")

  if args.dry_run:
    print(f"{len(members)} members of {args.sweep} in {args.workdir} "
          f"(commands run in {sweep.ROOT}):")
    errors = sweep.check_members(members)
    for member in members:
      status = sweep.member_status(os.path.join(args.workdir, member["name"]))
      print(f"{member['name']}  [{status}]\n  {shlex.join(member['command'])}")
      if member["name"] in errors:
        print(f"  {errors[member['name']]}")
    if errors:
      print(f"{len(errors)} of {len(members)} members would stop with a config error")
    return int(bool(errors))

  start = time.time()

  try:
    results = sweep.run_sweep(definition, args.workdir, args.parallel)
  except sweep.BadMember as error:
    sys.exit(f"Sweep error: {error}")
  except KeyboardInterrupt:
    print(f"Interrupted; run the same command to resume. Results so far: "
          f"{os.path.join(args.workdir, 'results.csv')}")
    return 130
  print(sweep.format_results(results))
  print(f"Results: {os.path.join(args.workdir, 'results.csv')}\n")
  print(compare.format_summary(sweep.summarize(results, definition)))
  print(f"Summary: {os.path.join(args.workdir, 'summary.csv')}")
  failed = int((results["status"] == "failed").any())
  if args.report:
    try:
      print(f"Report: {report.write_sweep_report(args.workdir)}")
    except papermill.PapermillExecutionError as error:  # the results stay; say why it stopped
      print(f"Report failed: {error.ename}: {error.evalue} (the executed notebook: "
            f"{os.path.join(args.workdir, 'report.ipynb')})")
      failed = 1
  print(f"Elapsed: {(time.time() - start) / 60:.1f} minutes")
  return failed


if __name__ == "__main__":
  runlock.interrupt_on_sigterm()
  sys.exit(main())
