"""Place a sweep's routers between two brackets of routing (configs/sweeps/headroom.py).

  python -m experiments.headroom runs/headroom
  python -m experiments.headroom runs/headroom --high "domain, num_experts=8, k=1, \
      expert_hidden_dim=512"

For every other group of the finished sweep: its paired difference in the metric (default the
macro mean of the per-domain bits per byte) to the low bracket (default random routing) and to
the high one (default the domain router), each with its 95% interval, and the share of the
low-to-high gap it closes with Fieller's 95% interval over the seeds (moe_jax/compare.gap_closed:
0 as random, 1 as the oracle; beyond 1, better than the oracle). Prints the table and writes it
to <sweep>/headroom.csv.
"""
import argparse
import os
import sys

from moe_jax import compare, sweep


def _difference(mean, low, high) -> str:
  return compare.format_interval(mean, low, high, signed=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("sweep_dir", help="a finished sweep's workdir")
  parser.add_argument("--metric", default="eval/bits_per_byte_macro")
  parser.add_argument("--low", default="random", help="the low bracket's group")
  parser.add_argument("--high", default="domain", help="the high bracket's group")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.sweep_dir, "sweep.json")):
    sys.exit(f"Headroom error: {args.sweep_dir} holds no sweep (no sweep.json)")
  results = sweep.collect_results(args.sweep_dir)
  if args.metric not in results:
    sys.exit(f"Headroom error: --metric={args.metric!r} is not in the sweep's results")
  try:
    table = compare.gap_closed(results, args.metric, args.low, args.high)
  except ValueError as error:
    sys.exit(f"Headroom error: {error}")
  table.to_csv(os.path.join(args.sweep_dir, "headroom.csv"), index=False)
  print(f"{compare.metric_name(args.metric)}: between {args.low} (share 0) and {args.high} "
        "(share 1), paired by seed")
  for row in table.itertuples():
    print(f"{row.group}: {_difference(row.diff_low, row.diff_low_low, row.diff_low_high)} vs "
          f"{args.low}, {_difference(row.diff_high, row.diff_high_low, row.diff_high_high)} vs "
          f"{args.high}; closes {compare.share_text(row)} of the gap ({row.n} seeds)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
