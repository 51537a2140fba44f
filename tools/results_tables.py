"""The generated blocks of RESULTS.md, README.md and docs/SWEEPS.md, from results/.

  ./py tools/results_tables.py           # rewrites the generated blocks of both pages
  ./py tools/results_tables.py --check   # exit 1 naming each block that differs (tests run it)

results/<sweep>/ holds what a finished sweep's numbers need: sweep.json (its definition and
members), results.csv (one row per member: moe_jax.sweep.collect_results), summary.csv, run.json
(the command, commit, date and time of the run) and, where computed, headroom.csv and
specialization.csv (experiments/headroom.py, experiments/specialization.py). Every statistic is
computed here again from the per-seed rows (moe_jax/compare.py), so a quoted interval can be
checked against the files.
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

from moe_jax import compare, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
PAGES = [ROOT / "RESULTS.md", ROOT / "README.md", ROOT / "docs" / "SWEEPS.md"]  # with blocks
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
  for group, rows in results.groupby("group", sort=False):
    stats = compare.interval(rows[MACRO])
    cells = [NAMES.get(group, group), fmt(stats["mean"], stats["ci_low"], stats["ci_high"])]
    if group in gaps.index:
      gap = gaps.loc[group]
      cells += [fmt(gap.diff_low, gap.diff_low_low, gap.diff_low_high, signed=True),
                fmt(gap.diff_high, gap.diff_high_low, gap.diff_high_high, signed=True),
                fmt(gap.share, gap.share_low, gap.share_high)]
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
  # (g) DEMix: domain experts against dense at equal active FLOPs.
  demix = paired(headroom, DEMIX, "dense", MACRO)
  split = paired(headroom, "domain", "dense", MACRO)
  per_domain = [paired(headroom, DEMIX, "dense", c) for c in headroom
                if c.startswith("eval/bits_per_byte/")]
  worse = sum(r["verdict"] == compare.WORSE for r in per_domain)
  better = sum(r["verdict"] == compare.BETTER for r in per_domain)
  rows.append(
      "| g | DEMix (Gururangan et al. 2022): experts of their own per domain beat a dense model "
      "at equal active FLOPs | `headroom.py`: the LM on multidomain_bytes, dense against the "
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


def main_job_summary() -> str:
  """The summary table `make run` prints (compare.format_summary), as a code block."""
  results = load("moe_vs_dense")
  summary = sweep.summarize(results, definition("moe_vs_dense"))
  return "```\n" + compare.format_summary(summary) + "\n```"


BLOCKS = {"main-job-summary": main_job_summary, "headroom": headroom_table, "headroom-domains": domain_table,
          "effects-g-k": effect_rows, "main-job": main_job_table,
          "main-job-unpaired": unpaired_sentence,
          "stdlib-job": lambda: main_job_table("moe_vs_dense_stdlib"),
          "stdlib-job-unpaired": lambda: unpaired_sentence("moe_vs_dense_stdlib")}


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
      print(f"{page.name}: generated blocks differ from results/: {', '.join(stale)}; run "
            "./py tools/results_tables.py", file=sys.stderr)
      status = 1
  return status


def block_of(text: str, name: str) -> str:
  return re.search(rf"<!-- generated: {name} -->.*?<!-- end: {name} -->", text, re.S)[0]


if __name__ == "__main__":
  sys.exit(main())
