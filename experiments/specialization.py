"""Domain specialization and routing saturation of a finished sweep's members on data with domain
labels (configs/sweeps/specialization.py, configs/sweeps/headroom.py).

  python -m experiments.specialization runs/specialization [--num-batches 4]

Per finished MoE member: the normalized mutual information between a token's domain and its
top-1 expert at the last checkpoint (moe_jax.analysis.specialization(by='domain'), mean over
the MoE layers) and, at each checkpoint step, the routing saturation (analysis.
routing_saturation: the share of each token's top-k that is its top-k at the last checkpoint,
mean over layers), on the first --num-batches evaluation batches. Writes
<sweep>/specialization.csv (one row per member: group, seed, nmi, saturation@<step>...) and
prints every group's mean with its 95% interval and its paired difference to the sweep's
baseline (moe_jax/compare.py).
"""
import argparse
import os
import sys

import pandas as pd

from moe_jax import analysis, compare, sweep


def member_row(run_dir: str, num_batches: int) -> dict:
  """nmi and saturation@<step> of one finished member."""
  decisions = analysis.routing_decisions(run_dir, num_batches=num_batches)
  if "domain" not in decisions:
    raise ValueError(f"{run_dir}: its data has no domain labels")
  row = {"nmi": analysis.specialization(decisions, by="domain")["mi_normalized"].mean()}
  saturation = analysis.routing_saturation(run_dir, num_batches=num_batches)
  for step, rows in saturation.groupby("step"):
    row[f"saturation@{step}"] = rows["saturation"].mean()
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("sweep_dir", help="a finished sweep's workdir")
  parser.add_argument("--num-batches", type=int, default=4)
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.sweep_dir, "sweep.json")):
    sys.exit(f"Specialization error: {args.sweep_dir} holds no sweep (no sweep.json)")
  results = sweep.collect_results(args.sweep_dir)
  rows = []
  for member in results[results["status"] == "finished"].itertuples():
    run_dir = os.path.join(args.sweep_dir, member.name)
    if analysis.load_run(run_dir).moe_layers:  # dense members route nothing
      rows.append({"name": member.name, "group": member.group, "seed": member.seed,
                   "status": "finished", **member_row(run_dir, args.num_batches)})
  table = pd.DataFrame(rows)
  table.to_csv(os.path.join(args.sweep_dir, "specialization.csv"), index=False)
  metrics = [column for column in table if column == "nmi" or column.startswith("saturation@")]
  baseline = analysis.sweep_definition(args.sweep_dir).get("baseline")
  print(compare.format_summary(compare.summarize(table, baseline, metrics)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
