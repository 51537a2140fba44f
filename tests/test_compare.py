"""Sweep statistics (moe_jax/compare.py) against scipy.stats, computed independently, on a results
table written here: paired and unpaired groups, a missing seed, a failed member, one seed."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_jax import compare

# Three seeds of dense (the baseline) and topk, expert_choice missing seed 2, switch failed at
# seed 1, soft trained at other seeds (unpaired), hash with one seed. Lower bits per byte is better.
BPB = {("dense", 0): 2.231, ("dense", 1): 2.244, ("dense", 2): 2.219,
       ("topk", 0): 2.190, ("topk", 1): 2.207, ("topk", 2): 2.181,
       ("expert_choice", 0): 2.229, ("expert_choice", 1): 2.250,
       ("switch", 0): 2.262, ("switch", 2): 2.251,
       ("soft", 5): 2.301, ("soft", 6): 2.282, ("soft", 7): 2.310,
       ("hash", 0): 2.240}
ACCURACY = {key: 1.0 - value / 4 for key, value in BPB.items()}


def results_table():
  rows = [{"name": f"{group},seed={seed}", "group": group, "seed": seed, "status": "finished",
           "eval/bits_per_byte": bpb, "eval/accuracy": ACCURACY[group, seed]}
          for (group, seed), bpb in BPB.items()]
  rows.insert(9, {"name": "switch,seed=1", "group": "switch", "seed": 1, "status": "failed",
                  "eval/bits_per_byte": math.nan, "eval/accuracy": math.nan})
  return pd.DataFrame(rows)


def values(group):
  return pd.Series({seed: v for (g, seed), v in BPB.items() if g == group})


@pytest.fixture(scope="module")
def summary():
  return compare.summarize(results_table(), baseline="dense").set_index(["group", "metric"])


def test_group_means_and_intervals_equal_scipy(summary):
  for group in ("dense", "topk", "expert_choice", "switch", "soft"):
    v = values(group).to_numpy()
    row = summary.loc[(group, "eval/bits_per_byte")]
    low, high = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert row["n"] == len(v)
    assert row["mean"] == pytest.approx(v.mean()) and row["std"] == pytest.approx(v.std(ddof=1))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
  # A group's failed member is left out: switch has seeds 0 and 2.
  assert summary.loc[("switch", "eval/bits_per_byte"), "n"] == 2


def test_paired_differences_equal_scipy_ttest_rel(summary):
  for group, seeds in (("topk", [0, 1, 2]), ("expert_choice", [0, 1]), ("switch", [0, 2])):
    member, base = values(group)[seeds].to_numpy(), values("dense")[seeds].to_numpy()
    test = stats.ttest_rel(member, base)
    low, high = test.confidence_interval(0.95)
    row = summary.loc[(group, "eval/bits_per_byte")]
    assert row["paired"] is True and row["n_diff"] == len(seeds)
    assert row["diff"] == pytest.approx((member - base).mean())
    assert (row["diff_low"], row["diff_high"]) == pytest.approx((low, high))
    # detectable: the true difference the paired t-test detects 80% of the time (scipy's
    # noncentral t at the critical value).
    se, dof = (member - base).std(ddof=1) / math.sqrt(len(seeds)), len(seeds) - 1
    critical = stats.t.ppf(0.975, dof)
    assert (stats.nct.sf(critical, dof, row["detectable"] / se)
            + stats.nct.cdf(-critical, dof, row["detectable"] / se)) == pytest.approx(0.8, abs=1e-9)
  # topk is lower in every pair by 0.037-0.041: better, whatever the seed spread (0.013).
  assert summary.loc[("topk", "eval/bits_per_byte"), "verdict"] == "better"
  assert summary.loc[("topk", "eval/accuracy"), "verdict"] == "better"  # accuracy: up is better
  assert summary.loc[("expert_choice", "eval/bits_per_byte"), "verdict"] == (
      "no detectable difference")
  assert summary.loc[("switch", "eval/bits_per_byte"), "verdict"] == "worse"


def test_groups_without_common_seeds_get_welch_intervals(summary):
  test = stats.ttest_ind(values("soft").to_numpy(), values("dense").to_numpy(), equal_var=False)
  low, high = test.confidence_interval(0.95)
  row = summary.loc[("soft", "eval/bits_per_byte")]
  assert row["paired"] is False and row["n_diff"] == 3
  assert row["diff"] == pytest.approx(values("soft").mean() - values("dense").mean())
  assert (row["diff_low"], row["diff_high"]) == pytest.approx((low, high))
  assert row["verdict"] == "worse"
  va, vb = stats.sem(values("soft")) ** 2, stats.sem(values("dense")) ** 2
  dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)  # Welch-Satterthwaite
  critical, lam = stats.t.ppf(0.975, dof), row["detectable"] / math.sqrt(va + vb)
  assert stats.nct.sf(critical, dof, lam) + stats.nct.cdf(-critical, dof, lam) == pytest.approx(
      0.8, abs=1e-9)


def test_detectable_difference_has_80_percent_power_where_the_t_shortcut_has_less():
  # One standard error: the noncentrality itself, checked by a simulation too (below).
  lam = {n: compare.detectable_difference(1.0, n - 1) for n in (2, 3, 4, 30)}
  assert lam[2] == pytest.approx(16.334009, abs=1e-6)
  assert lam[3] == pytest.approx(5.653489, abs=1e-6)
  assert lam[4] == pytest.approx(4.255899, abs=1e-6)
  for n, noncentrality in lam.items():
    assert compare.power(noncentrality, n - 1) == pytest.approx(0.8, abs=1e-9)
  # (t.975 + t.8) se, the shortcut the sweeps quoted before: power 0.73 at 2 seeds, 0.77 at 3;
  # at 30 seeds the two agree to 0.03%.
  shortcut = {n: stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1) for n in lam}
  assert [round(compare.power(shortcut[n], n - 1), 4) for n in (2, 3, 4)] == [0.7308, 0.7663,
                                                                                0.784]
  assert lam[30] == pytest.approx(shortcut[30], rel=3e-4)
  # The power of the paired test at 3 seeds, drawn: 200,000 trials of d ~ N(5.653 / sqrt(3), 1).
  d = np.random.default_rng(0).standard_normal((200_000, 3)) + lam[3] / math.sqrt(3)
  t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(3))
  assert (np.abs(t) > stats.t.ppf(0.975, 2)).mean() == pytest.approx(0.8, abs=0.003)
  assert compare.detectable_difference(0.02, 2) == pytest.approx(0.02 * lam[3])
  assert math.isnan(compare.detectable_difference(math.nan, 0))


def test_groups_without_spread_or_common_seeds_differ_exactly():
  # Welch's degrees of freedom are 0 / 0 here: the difference is exact, its interval zero-wide.
  table = pd.DataFrame({"group": ["dense"] * 2 + ["topk"] * 2 + ["same"] * 2,
                        "seed": [0, 1, 2, 3, 4, 5], "status": "finished",
                        "eval/accuracy": [0.5, 0.5, 0.625, 0.625, 0.5, 0.5]})
  rows = compare.summarize(table, "dense").set_index("group")
  assert rows.loc["topk", ["paired", "n_diff", "diff", "diff_low", "diff_high", "detectable",
                           "verdict"]].tolist() == [False, 2, 0.125, 0.125, 0.125, 0.0, "better"]
  assert rows.loc["same", ["diff", "diff_low", "diff_high", "verdict"]].tolist() == [
      0.0, 0.0, 0.0, "no detectable difference"]


def test_one_seed_says_so_instead_of_an_interval(summary):
  row = summary.loc[("hash", "eval/bits_per_byte")]
  assert row["n"] == 1 and math.isnan(row["ci_low"]) and math.isnan(row["std"])
  assert row["diff"] == pytest.approx(2.240 - 2.231) and math.isnan(row["diff_low"])
  assert row["verdict"] == "one seed: no interval" and math.isnan(row["detectable"])
  base = summary.loc[("dense", "eval/bits_per_byte")]
  assert math.isnan(base["diff"]) and not isinstance(base["verdict"], str)


def test_baseline_defaults_to_the_first_group_and_must_exist():
  table = results_table()
  assert set(compare.summarize(table)["baseline"]) == {"dense"}
  with pytest.raises(ValueError, match=r"^baseline 'top2' is not a group of the sweep; groups: "
                                       r"'dense', 'topk', 'expert_choice', 'switch', 'soft', "
                                       r"'hash'$"):
    compare.summarize(table, baseline="top2")


def test_formatting_has_three_significant_figures_intervals_and_verdicts(summary):
  assert [compare.significant(v) for v in (43210.2374, 2.2312, 0.041267, -0.0003999, 0.0,
                                           1.5e-7, math.nan)] == [
      "43200", "2.23", "0.0413", "-0.000400", "0", "1.50e-07", "-"]
  assert compare.format_interval(-0.04, -0.055, -0.027, signed=True) == (
      "-0.0400 [-0.0550, -0.0270]")
  table = compare.format_summary(compare.summarize(results_table(), "dense"))
  lines = table.splitlines()
  assert lines[0].split() == ["group", "metric", "seeds", "mean", "[95%", "CI]", "vs",
                              "baseline", "[95%", "CI]", "verdict", "detectable"]
  topk = next(line for line in lines if line.startswith("topk") and "bits_per_byte" in line)
  member, base = values("topk").to_numpy(), values("dense").to_numpy()
  low, high = stats.ttest_rel(member, base).confidence_interval(0.95)
  assert (f"{compare.significant((member - base).mean())} [{compare.significant(low)}, "
          f"{compare.significant(high)}]") in topk and topk.rstrip().split()[-2] == "better"
  assert "unpaired" in next(line for line in lines if line.startswith("soft"))
  sentences = compare.sentences(compare.summarize(results_table(), "dense"),
                                ["eval/bits_per_byte"])
  assert sentences[0] == (f"topk vs dense: {compare.format_interval((member - base).mean(), low, high, signed=True)} "
                          "bits per byte, 3 seeds, paired: better.")
  assert sentences[-1] == "hash vs dense: +0.00900 bits per byte, 1 seed, paired: one seed: no interval."


def test_speed_ratios_are_geometric_means_of_per_seed_ratios():
  # tokens/s: topk paired with dense at 3 seeds, soft at other seeds, hash with one seed.
  speed = {("dense", 0): 40000.0, ("dense", 1): 42000.0, ("dense", 2): 41000.0,
           ("topk", 0): 35000.0, ("topk", 1): 36500.0, ("topk", 2): 36000.0,
           ("soft", 5): 30000.0, ("soft", 6): 33000.0, ("hash", 0): 42000.0}
  table = pd.DataFrame([{"group": group, "seed": seed, "status": "finished", "tokens_per_s": v}
                        for (group, seed), v in speed.items()])
  ratios = compare.ratios(table, "tokens_per_s").set_index("group")
  topk = np.array([35000 / 40000, 36500 / 42000, 36000 / 41000])
  logs = np.log(topk)
  low, high = stats.t.interval(0.95, 2, loc=logs.mean(), scale=stats.sem(logs))
  row = ratios.loc["topk"]
  assert row["paired"] is True and row["n_diff"] == 3 and row["baseline"] == "dense"
  assert row["ratio"] == pytest.approx(np.prod(topk) ** (1 / 3))
  assert (row["ratio_low"], row["ratio_high"]) == pytest.approx((np.exp(low), np.exp(high)))
  assert row["verdict"] == "worse" and row["ratio_high"] < 1
  soft, dense = np.log([30000.0, 33000.0]), np.log([40000.0, 42000.0, 41000.0])
  welch = stats.ttest_ind(soft, dense, equal_var=False).confidence_interval(0.95)
  assert ratios.loc["soft", "paired"] is False
  assert ratios.loc["soft", "ratio"] == pytest.approx(np.exp(soft.mean() - dense.mean()))
  assert (ratios.loc["soft", "ratio_low"], ratios.loc["soft", "ratio_high"]) == pytest.approx(
      tuple(np.exp(welch)))
  assert math.isnan(ratios.loc["dense", "ratio"])
  sentences = compare.speed_sentences(ratios.reset_index())
  assert sentences[0] == (f"topk runs at {compare.significant(row['ratio'])}x dense's tokens/s "
                          f"[{compare.significant(np.exp(low))}, "
                          f"{compare.significant(np.exp(high))}], 3 seeds, paired: slower.")
  assert sentences[2] == (
      "hash runs at 1.05x dense's tokens/s, 1 seed, paired: one seed: no interval.")


def test_routing_statistics_compare_lower_is_better_or_without_a_direction():
  # MaxVio as the bits per byte above: topk has the lower values, so it balances better.
  table = results_table().assign(max_violation=lambda t: t["eval/bits_per_byte"],
                                 experts_per_token=lambda t: t["eval/bits_per_byte"])
  rows = compare.summarize(table, "dense", ["max_violation"]).set_index("group")
  assert rows.loc["topk", "verdict"] == "better" and rows.loc["topk", "diff"] < 0
  # Fewer experts per token is neither better nor worse: topk's are lower, switch's higher.
  rows = compare.summarize(table, "dense", ["experts_per_token"]).set_index("group")
  assert rows.verdict.tolist()[1:5] == ["lower", "no detectable difference", "higher", "higher"]
  assert compare.sentences(rows.reset_index(), ["experts_per_token"])[0].endswith(
      "experts per token, 3 seeds, paired: lower.")
  # MoE++'s and SMEAR's statistics declare no direction (routers.Statistic): neither.
  assert {metric: compare.direction(metric) for metric in (
      "experts_per_token", "zero_computation_share", "merge_entropy", "max_violation")} == {
          "experts_per_token": 0, "zero_computation_share": 0, "merge_entropy": 0,
          "max_violation": -1}
