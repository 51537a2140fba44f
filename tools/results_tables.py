"""The generated blocks of RESULTS.md, README.md, docs/ and BENCHMARKS.md, from results/ and
benchmarks/results/.

  ./py tools/results_tables.py           # rewrites the generated blocks of every page
  ./py tools/results_tables.py --check   # exit 1 naming each block that differs (tests run it)

results/<sweep>/ holds what a finished sweep's numbers need: sweep.json (its definition and
members), results.csv (one row per member: moe_jax.sweep.collect_results), summary.csv, run.json
(the command, commit, date and time of the run) and, where computed, headroom.csv and
specialization.csv (experiments/headroom.py, experiments/specialization.py). Every statistic is
computed here again from the per-seed rows (moe_jax/compare.py), so a quoted interval can be
checked against the files. BENCHMARKS.md's blocks come from tools/bench_tables.py.
A block sits between the lines `<!-- generated: NAME -->` and `<!-- end: NAME -->`;
BLOCKS maps each NAME to the function that writes it.
"""
import argparse
import json
import math
import pathlib
import re
import sys

import pandas as pd

import bench_tables  # tools/, this script's folder
from moe_jax import compare, sweep
from moe_jax.data import multidomain

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
PAGES = [ROOT / "RESULTS.md", ROOT / "README.md", ROOT / "docs" / "SWEEPS.md",
         ROOT / "docs" / "ROUTERS.md", ROOT / "docs" / "TRAINING.md", ROOT / "docs" / "DATA.md",
         ROOT / "BENCHMARKS.md"]  # with blocks
MACRO = "eval/bits_per_byte_macro"
DEMIX = "domain, num_experts=8, k=1, expert_hidden_dim=512"
NAMES = {"topk": "top-2", "domain": "domain (2 of 16)", DEMIX: "domain (1 of 8, DEMix)"}


def load(sweep: str, name: str = "results.csv") -> pd.DataFrame:
  return pd.read_csv(RESULTS_DIR / sweep / name)


def definition(sweep: str) -> dict:
  return json.loads((RESULTS_DIR / sweep / "sweep.json").read_text())["definition"]


def fmt(mean, low=float("nan"), high=float("nan"), signed=False) -> str:
  return compare.format_interval(mean, low, high, signed=signed)


def paired(results: pd.DataFrame, group: str, baseline: str, metric: str) -> dict:
  """The summary row of `group` against `baseline` in `metric` (paired by seed)."""
  summary = compare.summarize(results, baseline, [metric])
  return summary[summary["group"] == group].iloc[0].to_dict()


def difference(row: dict) -> str:
  """'+0.0410 [+0.0270, +0.0550], better' from a summary row."""
  return f"{fmt(row['diff'], row['diff_low'], row['diff_high'], signed=True)}, {row['verdict']}"


def mean_of(results: pd.DataFrame, group: str, metric: str) -> str:
  stats = compare.interval(results[results.group == group][metric].dropna())
  return fmt(stats["mean"], stats["ci_low"], stats["ci_high"])


def provenance(sweep: str) -> str:
  """'`<command>` at commit <c> on <date>, N minutes on <machine>.' (results/<sweep>/run.json)"""
  run = json.loads((RESULTS_DIR / sweep / "run.json").read_text())
  return (f"`{run['command']}` at commit {run['commit']} on {run['date']}, "
          f"{run['elapsed_minutes']} minutes on {run['machine']}.")


def headroom_table() -> str:
  """Each group's macro bits per byte, its paired difference to random and to the domain router
  (2 of 16 experts a domain) and the share of that gap it closes (Fieller's interval)."""
  results = load("headroom")
  seeds = len(definition("headroom")["seeds"])
  gaps = compare.gap_closed(results, MACRO, "random", "domain").set_index("group")
  lines = [provenance("headroom"), "",
           f"| group | macro bits per byte ({seeds} seeds) | vs random | vs domain (2 of 16) | "
           "share of the random-to-domain gap closed |", "|---|---|---|---|---|"]
  for group in results["group"].unique():
    cells = [NAMES.get(group, group), mean_of(results, group, MACRO)]
    if group in gaps.index:
      gap = gaps.loc[group]
      cells += [fmt(gap.diff_low, gap.diff_low_low, gap.diff_low_high, signed=True),
                fmt(gap.diff_high, gap.diff_high_low, gap.diff_high_high, signed=True),
                compare.share_text(gap)]
    else:
      cells += ["(bracket)" if group in ("random", "domain") else ""] * 3
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def domain_table() -> str:
  """Per domain: dense's bits per byte and each MoE group's paired difference to it."""
  results = load("headroom")
  domains = [c.split("/")[-1] for c in results if c.startswith("eval/bits_per_byte/")]
  groups = [g for g in results["group"].unique() if g != "dense"]
  lines = ["| domain | dense | " + " | ".join(f"{NAMES.get(g, g)} - dense" for g in groups)
           + " |", "|---" * (2 + len(groups)) + "|"]
  for domain in domains + ["macro"]:
    metric = MACRO if domain == "macro" else f"eval/bits_per_byte/{domain}"
    dense = compare.interval(results[results["group"] == "dense"][metric])
    cells = [domain, fmt(dense["mean"])]
    for group in groups:
      row = paired(results, group, "dense", metric)
      cells.append(fmt(row["diff"], row["diff_low"], row["diff_high"], signed=True))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def outcome(row: dict, claim: str) -> str:
  """The verdict on a paper's claim from a summary row of the claimed comparison: reproduced
  when the interval excludes 0 the claimed way ('better' or 'worse' than the baseline), not
  reproduced when it excludes 0 the other way, else not resolved (with what the seeds detect)."""
  if row["verdict"] == claim:
    return "reproduced"
  if row["verdict"] in (compare.BETTER, compare.WORSE):
    return "not reproduced: the other way"
  return (f"not resolved at this scale ({int(row['n_diff'])} seeds detect "
          f"{compare.significant(row['detectable'])})")


def effect_rows() -> str:
  """Rows g-k of the table of published effects."""
  headroom = load("headroom")
  seeds = len(definition("headroom")["seeds"])
  rows = ["| | paper's claim | sweep | our number (95% interval, seeds) | verdict |",
          "|---|---|---|---|---|"]
  dense = compare.interval(headroom[headroom.group == "dense"][MACRO])["mean"]
  # (g) DEMix: domain experts against dense at equal active FLOPs; the paper's form is a member
  # of the zoo sweep (its dense members are the headroom sweep's, to the last bit).
  zoo = load("zoo_domains")
  demix = paired(zoo, DEMIX, "dense", MACRO)
  split = paired(headroom, "domain", "dense", MACRO)
  per_domain = [paired(zoo, DEMIX, "dense", c) for c in zoo
                if c.startswith("eval/bits_per_byte/")]
  worse = sum(r["verdict"] == compare.WORSE for r in per_domain)
  better = sum(r["verdict"] == compare.BETTER for r in per_domain)
  rows.append(
      "| g | DEMix (Gururangan et al. 2022): experts of their own per domain beat a dense model "
      "at equal active FLOPs | `headroom.py` and `zoo_domains.py`: the LM on multidomain_bytes, "
      "dense against the "
      "domain router with the paper's one expert per domain (8 experts of the dense FFN's "
      "width, top-1) and with 2 of 16 half-width experts a domain (top-2) | macro bits per "
      f"byte against dense ({fmt(dense)}), "
      f"{seeds} seeds, paired: 1 of 8 {difference(demix)}, 2 of 16 {difference(split)}; per "
      f"domain (1 of 8): worse in {worse}, better in {better} of {len(per_domain)} domains "
      "(table above) | " + outcome(demix, compare.BETTER) + " |")
  # (h) learned top-k against random and hash routing.
  random, hashed = (paired(headroom, "topk", base, MACRO) for base in ("random", "hash"))
  if hashed["verdict"] == compare.WORSE:
    fixed = "reproduced, and more: the fixed hash router beats the learned one"
  elif hashed["verdict"] == compare.BETTER:
    fixed = "not reproduced: the learned router beats hash"
  else:
    fixed = (f"consistent (no detectable difference; {int(hashed['n_diff'])} seeds detect "
             f"{compare.significant(hashed['detectable'])})")
  rows.append(
      "| h | Roller et al. 2021; Fan et al. 2024: at small scale a fixed router routes about as "
      "well as a learned one | `headroom.py`: top-2 against hash (top-1 by the input byte, "
      "fixed) and random (top-1, a new random expert for every token: no fixed routing, the "
      "lower bracket) | macro bits per "
      f"byte, {seeds} seeds, paired: top-2 - hash {difference(hashed)}, top-2 - random "
      f"{difference(random)} | {fixed}; random routing is "
      f"{'worse than' if random['verdict'] == compare.BETTER else 'not told apart from'} "
      "top-2 |")
  rows += specialization_rows()
  return "\n".join(rows)


GLOBAL = "topk, aux_loss_weight=0.0, global_aux_loss_weight=0.01"


def specialization_rows() -> list:
  """Rows i (global-batch against per-sequence balancing), j (routing saturation) and k
  (specialization by domain)."""
  results, measured = load("specialization"), load("specialization", "specialization.csv")
  seeds = len(definition("specialization")["seeds"])
  quality = paired(results, GLOBAL, "topk", MACRO)
  nmi = paired(measured, GLOBAL, "topk", "nmi")
  local_nmi = compare.interval(measured[measured.group == "topk"]["nmi"])
  rows = [
      "| i | Qiu et al. 2025: balancing over the global batch instead of each micro-batch "
      "gives more domain specialization and better quality | `specialization.py`: top-2 with "
      "the load-balancing loss per sequence (a group is one sequence, so one domain) against "
      "the same loss over the whole batch (1e-2 each) | global - per sequence, "
      f"{seeds} seeds, paired: macro bits per byte {difference(quality)}; normalized mutual "
      f"information of domain and top-1 expert {difference(nmi)} (per sequence: "
      f"{fmt(local_nmi['mean'], local_nmi['ci_low'], local_nmi['ci_high'])}) | quality: "
      f"{outcome(quality, compare.BETTER)}; specialization: {outcome(nmi, 'higher')} |"]
  steps = sorted(int(c.split("@")[1]) for c in measured if c.startswith("saturation@"))
  final = steps[-1]
  topk = measured[measured.group == "topk"]
  early = {step: compare.interval(topk[f"saturation@{step}"]) for step in steps[:-1]}
  quoted = ", ".join(f"step {step} ({step / final:.0%} of training) "
                     f"{fmt(s['mean'], s['ci_low'], s['ci_high'])}" for step, s in early.items())
  half, quarter = early[final // 2], early[final // 4]
  if quarter["ci_low"] > 0.5:
    settled = "reproduced: more than half of the final top-2 is in place by a quarter of training"
  elif half["ci_low"] > 0.5:
    settled = ("partly: more than half of the final top-2 is in place by half of training, about "
               "half by a quarter; routing keeps moving to the end (OLMoE trains far longer)")
  else:
    settled = "not reproduced at this scale: routing still moves late"
  rows.append(
      "| j | OLMoE (Muennighoff et al. 2024): most routing decisions are fixed early in training "
      "(routing saturation) | `specialization.py`, top-2 with per-sequence balancing, "
      f"checkpoints every {steps[1] - steps[0]} steps | share of each token's top-2 at step t "
      f"that is its top-2 at step {final}, {seeds} seeds: {quoted} | {settled} |")
  headroom = load("headroom", "specialization.csv")
  by_group = {g: compare.interval(rows_["nmi"]) for g, rows_ in headroom.groupby("group")}
  quoted = "; ".join(f"{NAMES.get(g, g)} {fmt(v['mean'], v['ci_low'], v['ci_high'])}"
                     for g, v in by_group.items())
  top2 = by_group["topk"]
  rows.append(
      "| k | OLMoE: learned routers specialize strongly by domain; Mixtral: little | "
      "`headroom.py` members, last checkpoint, 4 evaluation batches of 32 sequences (16 of "
      "each domain) | normalized mutual information between a token's domain and its top-1 expert "
      f"(mean over layers; 0: independent, 1: the expert names the domain), {seeds} seeds: "
      f"{quoted} | top-2 reaches {top2['mean']:.0%} of the domain router's specialization: "
      + ("strong, as OLMoE" if top2["mean"] >= 0.5 else "weak, as Mixtral") + " |")
  return rows


def _verdict(row: dict) -> str:
  return {compare.NO_DIFFERENCE: "not resolved"}.get(row["verdict"], row["verdict"])


def zoo_table(name: str = "zoo_domains") -> str:
  """Every router of the zoo on multidomain_bytes: macro bits per byte, its paired difference to
  dense and to top-2 with the verdicts, its place on the random (0) to domain (1) scale, tokens/s
  as a multiple of dense's (contended members left out) and its experts per token."""
  results = load(name)
  seeds = len(definition(name)["seeds"])
  gaps = compare.gap_closed(results, MACRO, "random", "domain").set_index("group")
  speed = {row.group: row for row in sweep.relative_speed(results, definition(name)).itertuples()}
  lines = ["| router | macro bits per byte | vs dense | vs top-2 | random-to-domain share | "
           "tokens/s, x dense | experts per token |", "|---" * 7 + "|"]
  resolved = {"dense": [], "topk": []}
  for group, rows in results.groupby("group", sort=False):
    cells = [NAMES.get(group, group), mean_of(results, group, MACRO)]
    for baseline in ("dense", "topk"):
      if group == baseline:
        cells.append("(baseline)")
        continue
      row = paired(results, group, baseline, MACRO)
      cells.append(f"{fmt(row['diff'], row['diff_low'], row['diff_high'], signed=True)}, "
                   f"{_verdict(row)}")
      if row["verdict"] in (compare.BETTER, compare.WORSE) and group != "dense":
        resolved[baseline].append(f"{NAMES.get(group, group)} {row['verdict']}")
    cells.append(compare.share_text(gaps.loc[group]) if group in gaps.index else
                 "(bracket)" if group in ("random", "domain") else "")
    cells.append(compare.ratio_text(speed[group]) if group in speed else "")
    cells.append(compare.significant(rows["experts_per_token"].mean())
                 if rows["experts_per_token"].notna().any() else "")
    lines.append("| " + " | ".join(cells) + " |")
  routers = results["group"].nunique() - 1  # all but dense
  lines += ["", f"{seeds} seeds, paired by seed, 95% intervals (macro bits per byte: lower is "
            f"better). Resolved against dense: {len(resolved['dense'])} of {routers} routers "
            f"({', '.join(resolved['dense']) or 'none'}); against top-2: "
            f"{len(resolved['topk'])} of {routers - 1} ({', '.join(resolved['topk']) or 'none'}). "
            + provenance(name)]
  return "\n".join(lines)


BPB = "eval/bits_per_byte"


def main_job_table(name: str = "moe_vs_dense") -> str:
  """`make run`'s answer (or that of its run `name`): each group's eval bits per byte, top-2
  against dense paired by seed, and its tokens/s as a multiple of dense's (contended members
  left out)."""
  results = load(name)
  baseline = definition(name)["baseline"]
  topk = paired(results, "topk", baseline, BPB)
  speed = sweep.relative_speed(results, definition(name)).set_index("group")
  dense = compare.interval(results[results.group == baseline][BPB])
  top = compare.interval(results[results.group == "topk"][BPB])
  dense_speed = compare.interval(sweep.uncontended(results)[
      results.group == baseline]["tokens_per_s"].dropna())
  ratio = speed.loc["topk"]
  if not math.isfinite(ratio.ratio):
    speed_text = "not measured (contended)"
  elif math.isfinite(ratio.ratio_low):
    speed_text = (f"{compare.significant(ratio.ratio)}x [{compare.significant(ratio.ratio_low)}, "
                  f"{compare.significant(ratio.ratio_high)}]")
  else:  # one uncontended pair: no interval
    speed_text = f"{compare.significant(ratio.ratio)}x (1 seed)"
  return "\n".join([
      "| group | eval bits per byte | vs dense | verdict | tokens/s, x dense |",
      "|---|---|---|---|---|",
      f"| dense | {fmt(dense['mean'], dense['ci_low'], dense['ci_high'])} | | | "
      f"{compare.significant(dense_speed['mean']) if dense_speed['n'] else 'contended'} |",
      f"| top-2, 16 experts | {fmt(top['mean'], top['ci_low'], top['ci_high'])} | "
      f"{fmt(topk['diff'], topk['diff_low'], topk['diff_high'], signed=True)} | "
      f"{topk['verdict']} | {speed_text} |",
      "",
      f"{int(topk['n_diff'])} seeds, paired by seed, 95% intervals; {provenance(name)}"])


def unpaired_sentence(name: str = "moe_vs_dense") -> str:
  """The same comparison without pairing by seed (Welch's interval)."""
  results = load(name)
  values = {g: rows.set_index("seed")[BPB] for g, rows in results.groupby("group")}
  unpaired = compare.compare(values["topk"].reset_index(drop=True).rename(lambda i: -1 - i),
                             values["dense"], compare.direction(BPB))
  return (f"Unpaired, the same runs give "
          f"{fmt(unpaired['diff'], unpaired['diff_low'], unpaired['diff_high'], signed=True)} "
          f"({unpaired['verdict']}).")


def detectable(row: dict) -> str:
  return compare.significant(row["detectable"])


def rows_a_f() -> str:
  """Rows a-f of the table of published effects, each from its sweep's committed results; a
  sweep not yet committed is named below the table instead."""
  makers = {"experts": row_a, "capacity": row_b, "balancing": row_c, "zloss": row_d,
            "expert_choice": row_e, "deepseek": row_f}
  rows = ["| | paper's claim | sweep | our number (95% interval, seeds) | verdict |",
          "|---|---|---|---|---|"]
  missing = []
  for sweep_name, make in makers.items():
    if (RESULTS_DIR / sweep_name / "results.csv").exists():
      rows.append(make())
    else:
      missing.append(f"`{sweep_name}.py`")
  runs = [provenance(name) for name in makers if (RESULTS_DIR / name / "run.json").exists()]
  text = "\n".join(rows) + "\n\nRuns: " + " ".join(runs)
  if missing:
    text += ("\n\nNot yet run at the current code, so not quoted: " + ", ".join(missing)
             + " (their rows from earlier code are in git history).")
  return text


def row_a() -> str:
  results = load("experts")
  seeds = len(definition("experts")["seeds"])
  groups = [g for g in results.group.unique() if g != "dense"]
  pairs = {g: paired(results, g, "dense", BPB) for g in groups}
  experts = {g: g.split("num_experts=")[1] for g in groups}
  quoted = ", ".join(f"E = {experts[g]} {difference(pairs[g])}" for g in groups)
  better = [experts[g] for g in groups if pairs[g]["verdict"] == compare.BETTER]
  return ("| a | Switch Transformer: MoE beats dense at equal active FLOPs, and the gain grows "
          "with the number of experts | `experts.py`: dense and top-2 with E = "
          f"{', '.join(experts.values())} on the LM (Python stdlib) | bits per byte against "
          f"dense ({mean_of(results, 'dense', BPB)}), {seeds} seeds, paired: {quoted} "
          f"(detectable: {', '.join(detectable(pairs[g]) for g in groups)}) | "
          + (f"better than dense at E = {', '.join(better)}" if better else
             "not resolved at this scale: no E is told apart from dense")
          + "; the mean differences by E: "
          + ", ".join(f"{fmt(pairs[g]['diff'], signed=True)} (E = {experts[g]})" for g in groups)
          + " |")


def row_b() -> str:
  results = load("capacity")
  baseline = definition("capacity")["baseline"]
  seeds = len(definition("capacity")["seeds"])
  groups = [g for g in results.group.unique() if g != baseline]
  pairs = {g: paired(results, g, baseline, "eval/accuracy") for g in groups}
  short = lambda g: g.split(",")[0].replace("switch", "top-1").replace("topk", "top-2") + (
      " cf " + g.split("capacity_factor=")[1].split(",")[0])
  dropped = ", ".join(f"{short(g)} {results[results.group == g].dropped_fraction.mean():.1%}"
                      for g in results.group.unique())
  speed = {row.group: row for row in sweep.relative_speed(results, definition("capacity"))
           .itertuples()}
  speeds = ", ".join(f"{short(g)} {compare.ratio_text(speed[g])}" for g in groups
                     if g in speed)
  resolved = [g for g in groups if pairs[g]["verdict"] in (compare.BETTER, compare.WORSE)]
  slower = [short(g) for g in groups if g in speed and speed[g].ratio_high < 1]
  faster = [short(g) for g in groups if g in speed and speed[g].ratio_low > 1]
  return ("| b | Switch Transformer Table 1: top-1 is faster than top-2 and better for the time "
          "spent; capacity factors 1.0-1.25 suffice | `capacity.py`: the ViT, top-1 and top-2 "
          "(experts of equal width) x capacity factor 1.0 / 1.25 / 2.0 | eval accuracy against "
          f"{short(baseline)} ({mean_of(results, baseline, 'eval/accuracy')}), {seeds} seeds, "
          "paired: " + ", ".join(f"{short(g)} {difference(pairs[g])}" for g in groups)
          + f". Choices dropped in training: {dropped}. Tokens/s against {short(baseline)} "
          f"(contended members left out): {speeds or 'not measured'} | quality: "
          + (", ".join(f"{short(g)} {pairs[g]['verdict']}" for g in resolved) if resolved else
             f"no setting told apart from {short(baseline)} ({seeds} seeds)")
          + "; speed: slower than it: " + (", ".join(slower) or "none")
          + "; faster: " + (", ".join(faster) or "none") + " (see run.json for the machine) |")


def row_c() -> str:
  results = load("balancing")
  seeds = len(definition("balancing")["seeds"])
  none, free = "topk, aux_loss_weight=0.0", "loss_free"
  stats = {(g, m): paired(results, g, "topk", m) for g in (none, free)
           for m in ("max_violation", "dropped_fraction", BPB)}
  points = lambda row: (f"{row['diff'] * 100:+.1f} points [{row['diff_low'] * 100:+.1f}, "
                        f"{row['diff_high'] * 100:+.1f}]")
  collapse = (stats[none, "max_violation"]["verdict"] == compare.WORSE
              and stats[none, BPB]["verdict"] == compare.WORSE)
  wang = stats[free, "max_violation"]
  return (
      "| c | Switch; Wang et al. 2024: without balancing the router collapses; the loss-free "
      "bias balances better than the aux loss at no cost in quality | `balancing.py`: top-2 on "
      "the LM (Python stdlib) with the aux loss (1e-2), the loss-free bias (u = 1e-3, no aux "
      "loss), or nothing; all with the z-loss | against the aux loss, "
      f"{seeds} seeds, paired. No balancing: MaxVio {mean_of(results, none, 'max_violation')} "
      f"against {mean_of(results, 'topk', 'max_violation')} "
      f"({difference(stats[none, 'max_violation'])}), dropped choices "
      f"{points(stats[none, 'dropped_fraction'])}, bits per byte "
      f"{difference(stats[none, BPB])}. Loss-free: MaxVio "
      f"{mean_of(results, free, 'max_violation')} ({difference(wang)}), dropped choices "
      f"{points(stats[free, 'dropped_fraction'])}, bits per byte "
      f"{difference(stats[free, BPB])} (detectable: {detectable(stats[free, BPB])}) | "
      f"Switch's half: {'reproduced' if collapse else 'not reproduced'} (without balancing "
      "the load piles up and quality falls); Wang et al.'s half, balance: "
      f"{outcome(wang, compare.BETTER)}; quality: {outcome(stats[free, BPB], compare.BETTER)} "
      "(the bias moves by u = 1e-3 a step over 400 steps; the paper trains far longer) |")


def row_d() -> str:
  results = load("zloss")
  seeds = len(definition("zloss")["seeds"])
  without = "topk, z_loss_weight=0.0"
  logits, quality = (paired(results, without, "topk", m) for m in ("max_logit", BPB))
  return (
      "| d | ST-MoE (Zoph et al. 2022): the router z-loss (1e-3) keeps router logits small, at "
      "no cost in quality | `zloss.py`: top-2 on the LM (Python stdlib) with and without the "
      f"z-loss | largest router logit {mean_of(results, 'topk', 'max_logit')} with it, "
      f"{mean_of(results, without, 'max_logit')} without: {difference(logits)} without it, "
      f"{seeds} seeds, paired. Bits per byte without minus with: {difference(quality)} "
      f"(detectable: {detectable(quality)}) | logits: {outcome(logits, compare.WORSE)}; "
      "quality cost: " + ("none detected, within what the seeds detect"
                          if quality["verdict"] == compare.NO_DIFFERENCE else
                          "the z-loss run is "
                          + ("better" if quality["verdict"] == compare.WORSE else "worse"))
      + " |")


def row_e() -> str:
  results = load("expert_choice")
  seeds = len(definition("expert_choice")["seeds"])
  row = paired(results, "expert_choice", "topk", "eval/accuracy")
  dropped = results[results.group == "topk"].dropped_fraction
  return (
      "| e | Zhou et al. 2022: expert choice beats top-2 tokens-choose at equal compute | "
      "`expert_choice.py`: the ViT, 400 steps, expert choice at capacity factor 2 against top-2 "
      "(experts of width mlp_dim / 2 in both) | eval accuracy expert choice minus top-2: "
      f"{difference(row)}, {seeds} seeds, paired "
      f"({mean_of(results, 'expert_choice', 'eval/accuracy')} against "
      f"{mean_of(results, 'topk', 'eval/accuracy')}; detectable: {detectable(row)}). "
      f"Expert choice drops nothing; top-2 drops {dropped.min():.1%}-{dropped.max():.1%} of its "
      f"choices at capacity factor 1.25 | {outcome(row, compare.BETTER)} |")


def row_f() -> str:
  results = load("deepseek")
  seeds = len(definition("deepseek")["seeds"])
  row = paired(results, "deepseek", "topk", BPB)
  speed = {r.group: r for r in sweep.relative_speed(results, definition("deepseek")).itertuples()}
  spread = results.pivot(index="seed", columns="group", values=BPB)
  spread = (spread["deepseek"] - spread["topk"]).std()
  main = load("moe_vs_dense_stdlib").pivot(index="seed", columns="group", values=BPB)
  main_spread = (main["topk"] - main["dense"]).std()
  return (
      "| f | DeepSeekMoE: fine-grained + shared experts beat top-2 at equal active FLOPs | "
      "`deepseek.py`: 64 experts of width mlp_dim / 8, 6 routed + 2 shared, against top-2 on "
      f"the LM (Python stdlib) | bits per byte deepseek minus top-2: {difference(row)}, {seeds} "
      f"seeds, paired ({mean_of(results, 'deepseek', BPB)} against "
      f"{mean_of(results, 'topk', BPB)}; detectable: {detectable(row)}); tokens/s "
      + (f"{compare.ratio_text(speed['deepseek'])} top-2's" if "deepseek" in speed else
         "not measured (contended)")
      + f" | {outcome(row, compare.BETTER)}: the paired spread here "
      f"({compare.significant(spread)}) is {spread / main_spread:.1f}x that of the stdlib main "
      f"job's top-2 - dense ({compare.significant(main_spread)}) |")


def duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f"{minutes} min {seconds} s"


def commands_block(targets=("run", "test")) -> str:
  """The times of `make <target>` (results/commands.json, written by tools/time_commands.py)."""
  path = RESULTS_DIR / "commands.json"
  entries = json.loads(path.read_text()) if path.exists() else {}
  lines = []
  for target in targets:
    entry = entries.get(target)
    if entry is None:
      lines.append(f"- `make {target}`: not timed yet (`./py tools/time_commands.py {target}`).")
      continue
    tests = (f", {entry['passed']} tests passed ({duration(entry['pytest_seconds'])} of it in "
             "pytest)") if "passed" in entry else ""
    lines.append(
        f"- `make {target}`: {duration(entry['seconds'])} from a fresh clone{tests}, at commit "
        f"{entry['commit']} on {entry['date'][:10]}: {entry['cpu_count']} CPU cores "
        f"({entry['processor']}), float32 matmul peak {entry['peak_gflops_before']:.0f} GFLOP/s "
        f"before and {entry['peak_gflops_after']:.0f} after.")
  return "\n".join(lines)


def corpus_sizes() -> str:
  """docs/DATA.md's table of the default multidomain_bytes corpus (results/corpus.json)."""
  sizes = json.loads((RESULTS_DIR / "corpus.json").read_text())
  return (f"Corpus `{sizes['corpus']}` (Debian {sizes['debian']}, Python {sizes['python']}; "
          "`./py -m moe_jax.data --json results/corpus.json` writes it again):\n\n"
          + multidomain.size_table(sizes))


def main_job_summary() -> str:
  """The summary table `make run` prints (compare.format_summary), as a code block."""
  results = load("moe_vs_dense")
  summary = sweep.summarize(results, definition("moe_vs_dense"))
  return "```\n" + compare.format_summary(summary) + "\n```"


BLOCKS = {"main-job-summary": main_job_summary, "commands": commands_block,
          "train-command": lambda: commands_block(["train"]), "corpus-sizes": corpus_sizes,
          "headroom": headroom_table, "headroom-domains": domain_table, "effects-g-k": effect_rows,
          "main-job": main_job_table, "main-job-unpaired": unpaired_sentence,
          "stdlib-job": lambda: main_job_table("moe_vs_dense_stdlib"),
          "stdlib-job-unpaired": lambda: unpaired_sentence("moe_vs_dense_stdlib"),
          "zoo-domains": zoo_table, "effects-a-f": rows_a_f} | bench_tables.BLOCKS


def render(text: str) -> str:
  """A page's text with every generated block written anew."""
  def block(match):
    name = match.group(1)
    if name not in BLOCKS:
      raise ValueError(f"a page names a generated block {name!r}; known: {sorted(BLOCKS)}")
    return f"<!-- generated: {name} -->\n{BLOCKS[name]()}\n<!-- end: {name} -->"
  return re.sub(r"<!-- generated: (\S+) -->\n.*?<!-- end: \1 -->", block, text, flags=re.S)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a generated block differs from the files")
  args = parser.parse_args(argv)
  status = 0
  for page in PAGES:
    text = page.read_text()
    rendered = render(text)
    if not args.check:
      page.write_text(rendered)
      continue
    stale = [name for name in re.findall(r"<!-- generated: (\S+) -->", text)
             if block_of(text, name) != block_of(rendered, name)]
    if stale:
      print(f"{page.name}: generated blocks differ from the committed results: "
            f"{', '.join(stale)}; run ./py tools/results_tables.py", file=sys.stderr)
      status = 1
  return status


def block_of(text: str, name: str) -> str:
  return re.search(rf"<!-- generated: {name} -->.*?<!-- end: {name} -->", text, re.S)[0]


if __name__ == "__main__":
  sys.exit(main())
