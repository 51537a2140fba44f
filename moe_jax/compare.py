"""Comparisons between sweep groups: how sure a sweep is that one router beats another.

Members that differ only by `seed` form a group; members of two groups that share a seed share
their data order and every common initial parameter (common random numbers), so the difference
of a group against the baseline is taken in pairs, seed by seed:

  d_s = metric(group, seed s) - metric(baseline, seed s)
  mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)                     (n seeds present in both)

A verdict of better or worse needs the interval to exclude 0; the metric's direction says which
(accuracy and tokens/s up; losses and bits per byte down); a metric without one (experts per
token) is higher or lower. Groups that share no seed with the baseline are compared unpaired
(Welch's interval); two groups without spread differ exactly, with a zero-width interval.

`detectable` is the smallest true difference that this test (two-sided, 5%) detects with 80%
power at the observed spread: lambda se, with se the standard error of the difference (paired
sd(d) / sqrt(n); unpaired Welch's sqrt(sd_a^2 / n_a + sd_b^2 / n_b)) and lambda the
noncentrality at which a noncentral t with the test's degrees of freedom exceeds the test's
critical value 80% of the time (scipy.stats.nct). The shortcut
(t_{0.975} + t_{0.8}) se has less power at few seeds: 0.73 at n = 2, 0.77 at n = 3 (lambda is
16.3, 5.65, 4.26 for n = 2, 3, 4 paired seeds, against the shortcut's 14.1, 5.36, 4.16). For
Welch's test the power is approximate (its statistic is only nearly noncentral t).

Speeds compare as ratios (`ratios`: 0.87x the baseline's tokens/s), the same comparison made on
the logarithms: the geometric mean of the per-seed ratios, with its interval.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

CONFIDENCE = 0.95
POWER = 0.8
# +1: higher is better, -1: lower is better. The metrics a sweep compares, where present.
DIRECTIONS = {"eval/accuracy": 1, "eval/loss": -1, "eval/bits_per_byte": -1,
              "train/task_loss": -1, "tokens_per_s": 1}
# The MoE layers' routing statistics of results.csv, compared when asked for. 0: neither
# direction is better (a router's realized experts per token says how it routes, not how well):
# higher or lower. A router's own statistics declare theirs (routers.Statistic.direction).
STAT_DIRECTIONS = {"dropped_fraction": -1, "load_cv": -1, "max_violation": -1, "max_logit": -1,
                   "experts_per_token": 0}
DOMAIN_BPB = "eval/bits_per_byte"  # the prefix of the per-domain and macro bits per byte


def direction(metric: str) -> int:
  """+1 higher is better, -1 lower, 0 neither (a metric of no table): DIRECTIONS and
  STAT_DIRECTIONS, every bits per byte of data with domains (a domain's, their macro mean)
  lower, and a registered router's own statistic as it declares (routers.Statistic)."""
  if metric.startswith(DOMAIN_BPB):
    return -1
  known = {**DIRECTIONS, **STAT_DIRECTIONS}
  if metric in known:
    return known[metric]
  from moe_jax import routers  # here: the statistics alone need JAX's import
  return routers.statistic_directions().get(metric, 0)


BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
HIGHER, LOWER = "higher", "lower"
ONE_SEED = "one seed: no interval"
# summary.csv's columns, one row per (group, metric).
COLUMNS = ("group", "metric", "n", "mean", "std", "ci_low", "ci_high", "baseline", "paired",
           "n_diff", "diff", "diff_low", "diff_high", "detectable", "verdict")


def t_quantile(q: float, dof: float) -> float:
  return float(stats.t.ppf(q, dof))


def interval(values: Sequence[float]) -> Dict[str, float]:
  """n, mean, standard deviation and the 95% t-interval of the mean (NaN below 2 values)."""
  values = np.asarray(values, np.float64)
  n = len(values)
  mean = float(values.mean()) if n else math.nan
  std = float(values.std(ddof=1)) if n > 1 else math.nan
  half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
  return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def power(noncentrality: float, dof: float) -> float:
  """The two-sided t-test's power (at 1 - CONFIDENCE) when the true difference is
  `noncentrality` standard errors; P(T < -c) as P(T > c) at -noncentrality (scipy's nct.cdf
  returns NaN that far in the tail)."""
  critical = t_quantile(0.5 + CONFIDENCE / 2, dof)
  return float(stats.nct.sf(critical, dof, noncentrality)
               + stats.nct.sf(critical, dof, -noncentrality))


def detectable_difference(standard_error: float, dof: float) -> float:
  """The smallest true difference the test detects with POWER at this standard error of the
  difference (paired: sd / sqrt(n), dof n - 1); NaN without degrees of freedom."""
  if not dof > 0:
    return math.nan
  # Welch's dof is at least 1, where 80% power needs 16.3 standard errors: 100 brackets it.
  noncentrality = optimize.brentq(lambda x: power(x, dof) - POWER, 0, 100, xtol=1e-12)
  return noncentrality * standard_error


def verdict(low: float, high: float, direction: int) -> str:
  """better / worse (higher / lower for direction 0) when the interval of (group - baseline)
  excludes 0, else no difference. A zero-width interval at 0 (no spread, no difference) is no
  difference."""
  if math.isnan(low):
    return ONE_SEED
  if low > 0 or high < 0:
    if direction == 0:
      return HIGHER if low > 0 else LOWER
    return BETTER if (low > 0) == (direction > 0) else WORSE
  return NO_DIFFERENCE


def compare(group: pd.Series, baseline: pd.Series, direction: int) -> Dict[str, object]:
  """The difference group - baseline of one metric; both Series are indexed by seed.

  Paired over the seeds in both when there are any, else unpaired (Welch).
  """
  common = group.index.intersection(baseline.index)
  if len(common):
    diffs = interval(group[common] - baseline[common])
    return {"paired": True, "n_diff": diffs["n"], "diff": diffs["mean"],
            "diff_low": diffs["ci_low"], "diff_high": diffs["ci_high"],
            "detectable": detectable_difference(diffs["std"] / math.sqrt(diffs["n"]),
                                                diffs["n"] - 1),
            "verdict": verdict(diffs["ci_low"], diffs["ci_high"], direction)}
  a, b = interval(group), interval(baseline)
  diff = a["mean"] - b["mean"]
  if a["n"] < 2 or b["n"] < 2:
    return {"paired": False, "n_diff": min(a["n"], b["n"]), "diff": diff, "diff_low": math.nan,
            "diff_high": math.nan, "detectable": math.nan, "verdict": ONE_SEED}
  va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
  n = min(a["n"], b["n"])
  if va + vb == 0:  # every seed of both the same: the difference is exact (Welch's dof is 0/0)
    return {"paired": False, "n_diff": n, "diff": diff, "diff_low": diff, "diff_high": diff,
            "detectable": 0.0, "verdict": verdict(diff, diff, direction)}
  dof = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
  half = t_quantile(0.5 + CONFIDENCE / 2, dof) * math.sqrt(va + vb)
  return {"paired": False, "n_diff": n, "diff": diff, "diff_low": diff - half,
          "diff_high": diff + half, "detectable": detectable_difference(math.sqrt(va + vb), dof),
          "verdict": verdict(diff - half, diff + half, direction)}


def summarize(results: pd.DataFrame, baseline: Optional[str] = None,
              metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
  """Per group and metric: seeds, mean, spread and interval, and the comparison to the baseline.

  results: one row per member with columns group, seed, status and the metrics (failed and
  unfinished members are left out). baseline: a group's label (default: the first group).
  Returns the COLUMNS, groups in order of appearance; the baseline's comparison columns are
  empty. Raises ValueError for a baseline that is not a group.
  """
  finished = results[results["status"] == "finished"]
  groups = list(dict.fromkeys(results["group"]))
  baseline = groups[0] if baseline is None and groups else baseline
  if baseline not in groups:
    raise ValueError(f"baseline {baseline!r} is not a group of the sweep; groups: "
                     f"{', '.join(map(repr, groups))}")
  metrics = metrics or [*DIRECTIONS, *(m for m in finished.columns  # with domains: each one's
                                        if m.startswith(DOMAIN_BPB) and m not in DIRECTIONS)]
  metrics = [m for m in metrics if m in finished.columns and finished[m].notna().any()]
  by_group = {group: rows.set_index("seed") for group, rows in finished.groupby("group")}
  empty = pd.DataFrame(columns=["seed", *metrics]).set_index("seed")
  references = {metric: by_group.get(baseline, empty)[metric].dropna() for metric in metrics}
  rows = []
  for group in groups:
    members = by_group.get(group, empty)
    for metric in metrics:
      values, reference = members[metric].dropna(), references[metric]
      row = {"group": group, "metric": metric, **interval(values), "baseline": baseline}
      if group != baseline and len(values) and len(reference):
        row.update(compare(values, reference, direction(metric)))
      rows.append(row)
  return pd.DataFrame(rows, columns=COLUMNS)


def significant(value: float, digits: int = 3) -> str:
  """A number to `digits` significant figures, without exponent for everyday sizes: 0.0413,
  2.23, 43200."""
  if value is None or not math.isfinite(value):
    return "-"
  if value == 0:
    return "0"
  exponent = math.floor(math.log10(abs(value)))
  if exponent >= 6 or exponent < -4:
    return f"{value:.{digits - 1}e}"
  decimals = digits - 1 - exponent
  return f"{round(value, decimals):.{max(decimals, 0)}f}"


def format_interval(mean: float, low: float, high: float, signed: bool = False) -> str:
  """'2.23 [2.21, 2.25]' (or '+0.0410 [...]' for a difference); the mean alone without one."""
  text = significant(mean)
  if signed and math.isfinite(mean) and mean > 0:
    text = "+" + text
  return text + _bracket(low, high)


def _bracket(low: float, high: float) -> str:
  """' [low, high]' to 3 significant figures, '' without an interval."""
  return f" [{significant(low)}, {significant(high)}]" if math.isfinite(low) else ""


def difference_text(row) -> str:
  """A summary row's (a namedtuple of COLUMNS) difference to the baseline with its interval,
  '+0.0410 [0.0270, 0.0550]' ('unpaired' added without common seeds), or 'baseline'."""
  if row.group == row.baseline:
    return "baseline"
  if not math.isfinite(row.diff):
    return "-"
  return (format_interval(row.diff, row.diff_low, row.diff_high, signed=True)
          + ("" if row.paired is True else " unpaired"))


def verdict_text(row, verdicts: Optional[Dict[str, str]] = None) -> str:
  """A summary (or ratios) row's verdict, renamed by `verdicts`; '' for the baseline."""
  if row.group == row.baseline:
    return ""
  return (verdicts or {}).get(row.verdict, row.verdict) if isinstance(row.verdict, str) else "-"


def format_summary(summary: pd.DataFrame) -> str:
  """The summary as a terminal table: per group and metric, mean [95% interval] over n seeds,
  the difference to the baseline with its interval, the verdict and the detectable difference."""
  rows = list(summary.itertuples(index=False))
  table = pd.DataFrame({
      "group": summary["group"], "metric": summary["metric"],
      "seeds": summary["n"].astype(int).astype(str),
      "mean [95% CI]": [format_interval(row.mean, row.ci_low, row.ci_high) for row in rows],
      "vs baseline [95% CI]": list(map(difference_text, rows)),
      "verdict": list(map(verdict_text, rows)),
      "detectable": [significant(row.detectable) if row.group != row.baseline else ""
                     for row in rows]})
  widths = {c: max(len(c), *map(len, table[c])) if len(table) else len(c) for c in table}
  return "\n".join("  ".join(str(v).ljust(widths[c]) for c, v in zip(table, row)).rstrip()
                   for row in [list(table.columns), *table.itertuples(index=False)])


def metric_name(metric: str) -> str:
  """'eval/bits_per_byte' -> 'bits per byte'."""
  return metric.split("/")[-1].replace("_", " ")


def _seeds(n: float) -> str:
  return f"{n:.0f} seed{'s' if n != 1 else ''}"


def sentences(summary: pd.DataFrame, metrics: Sequence[str]) -> list:
  """One sentence per group and metric against the baseline: 'topk vs dense: -0.0399 bits per
  byte [-0.0726, -0.00719], 3 seeds, paired: better.'"""
  out = []
  for row in summary[summary["group"] != summary["baseline"]].itertuples(index=False):
    if row.metric not in metrics or not isinstance(row.verdict, str):
      continue
    out.append(f"{row.group} vs {row.baseline}: "
               f"{format_interval(row.diff, row.diff_low, row.diff_high, signed=True)} "
               f"{metric_name(row.metric)}, "
               f"{_seeds(row.n_diff)}, {'paired' if row.paired is True else 'unpaired'}: "
               f"{row.verdict}.")
  return out


RATIO_COLUMNS = ("group", "metric", "n", "baseline", "paired", "n_diff", "ratio", "ratio_low",
                 "ratio_high", "verdict")


def ratios(results: pd.DataFrame, metric: str, baseline: Optional[str] = None) -> pd.DataFrame:
  """Each group's metric as a multiple of the baseline group's (for speeds: 0.87x).

  The comparison of `summarize` on log(metric), turned back: paired, the geometric mean of the
  per-seed ratios group / baseline with its 95% interval; unpaired, the ratio of the groups'
  geometric means (Welch's interval on the logs). Geometric, so a group at half the speed and
  one at twice it are equally far from 1. results: as for summarize (the metric > 0).
  Returns RATIO_COLUMNS, one row per group (the baseline's comparison columns empty); verdict as
  in summarize, by the metric's direction.
  """
  logs = summarize(results.assign(**{metric: np.log(results[metric])}), baseline, [metric])
  logs = logs.rename(columns={"diff": "ratio", "diff_low": "ratio_low", "diff_high": "ratio_high"})
  for column in ("ratio", "ratio_low", "ratio_high"):
    logs[column] = np.exp(logs[column].astype(float))
  return logs[list(RATIO_COLUMNS)]


SPEED_VERDICTS = {BETTER: "faster", WORSE: "slower"}


def ratio_text(row) -> str:
  """A ratios row's ratio with its interval, '0.752x [0.713, 0.794]', or 'baseline'."""
  if row.group == row.baseline:
    return "baseline"
  if not math.isfinite(row.ratio):
    return "-"
  return f"{significant(row.ratio)}x{_bracket(row.ratio_low, row.ratio_high)}"


def speed_sentences(speed: pd.DataFrame) -> list:
  """One sentence per group from `ratios` of tokens/s: 'topk runs at 0.752x dense's tokens/s
  [0.713, 0.794], 3 seeds, paired: slower.'"""
  return [f"{row.group} runs at {significant(row.ratio)}x {row.baseline}'s tokens/s"
          f"{_bracket(row.ratio_low, row.ratio_high)}, {_seeds(row.n_diff)}, "
          f"{'paired' if row.paired is True else 'unpaired'}: "
          f"{verdict_text(row, SPEED_VERDICTS)}."
          for row in speed[speed["group"] != speed["baseline"]].itertuples(index=False)
          if isinstance(row.verdict, str)]


# ----------------------------------------------------------------------------------------------
# Between two brackets: the share of a gap that a group closes.


def fieller_interval(numerator: Sequence[float], denominator: Sequence[float],
                     confidence: float = CONFIDENCE) -> Dict[str, float]:
  """mean(numerator) / mean(denominator) of paired samples (one pair per seed), with Fieller's
  interval: the ratios R for which mean(numerator) - R mean(denominator) is within t_{q, n-1}
  of its standard error (using the samples' covariance), i.e. the R between the roots of
  (b^2 - t^2 v_bb) R^2 - 2 (a b - t^2 v_ab) R + a^2 - t^2 v_aa = 0 (a, b the means; v the
  variances and covariance of the means). Unbounded (low -inf, high +inf) when the denominator
  is not told apart from 0 (b^2 <= t^2 v_bb). Returns {"n", "ratio", "low", "high"}."""
  a_values, b_values = np.asarray(numerator, float), np.asarray(denominator, float)
  n = len(a_values)
  a, b = a_values.mean(), b_values.mean()
  ratio = a / b if b else math.nan
  if n < 2:
    return {"n": n, "ratio": ratio, "low": math.nan, "high": math.nan}
  (v_aa, v_ab), (_, v_bb) = np.cov(a_values, b_values) / n
  t2 = t_quantile(0.5 + confidence / 2, n - 1) ** 2
  quadratic, half_linear, constant = b * b - t2 * v_bb, a * b - t2 * v_ab, a * a - t2 * v_aa
  if quadratic <= 0:
    return {"n": n, "ratio": ratio, "low": -math.inf, "high": math.inf}
  root = math.sqrt(max(half_linear ** 2 - quadratic * constant, 0.0))
  return {"n": n, "ratio": ratio, "low": (half_linear - root) / quadratic,
          "high": (half_linear + root) / quadratic}


def gap_closed(results: pd.DataFrame, metric: str, low: str, high: str) -> pd.DataFrame:
  """Where each group sits between two bracket groups, seed by seed: its paired difference to
  the `low` bracket (random routing, say) and to the `high` one (the domain oracle), and the
  share of the low-to-high gap it closes, (m_low - m) / (m_low - m_high) (the same whichever
  way the metric improves; 0: as the low bracket, 1: as the high), with Fieller's 95% interval
  over the seeds all three share (fieller_interval). results: collect_results' rows (finished members).
  Returns one row per other group: group, n, diff_low (mean m - m_low), diff_low_low/high (its
  paired interval), diff_high, diff_high_low/high, share, share_low, share_high."""
  finished = results[results["status"] == "finished"]
  by_group = {group: rows.set_index("seed")[metric].dropna()
              for group, rows in finished.groupby("group", sort=False)}
  for bracket in (low, high):
    if bracket not in by_group:
      raise ValueError(f"bracket {bracket!r} is not a group with {metric}; groups: "
                       f"{', '.join(map(repr, by_group))}")
  rows = []
  for group, values in by_group.items():
    if group in (low, high):
      continue
    seeds = values.index.intersection(by_group[low].index).intersection(by_group[high].index)
    m, m_low, m_high = (by_group[g][seeds].to_numpy() for g in (group, low, high))
    to_low, to_high = interval(m - m_low), interval(m - m_high)
    share = fieller_interval(m_low - m, m_low - m_high)
    rows.append({"group": group, "n": len(seeds), "diff_low": to_low["mean"],
                 "diff_low_low": to_low["ci_low"], "diff_low_high": to_low["ci_high"],
                 "diff_high": to_high["mean"], "diff_high_low": to_high["ci_low"],
                 "diff_high_high": to_high["ci_high"], "share": share["ratio"],
                 "share_low": share["low"], "share_high": share["high"]})
  return pd.DataFrame(rows)


def share_text(row) -> str:
  """A gap_closed row's share with Fieller's interval, '0.841 [0.757, 0.941]', or, where the
  interval is unbounded (the brackets are not told apart), the share and that reason."""
  if math.isinf(row.share_low):
    return f"{significant(row.share)} [unbounded: the brackets are not told apart]"
  return format_interval(row.share, row.share_low, row.share_high)
