"""The generated blocks of BENCHMARKS.md, from the JSON that benchmarks/ writes.

Each block reads files of benchmarks/results/ (a benchmark's `--out`: its command line, commit,
date, machine, load average, matmul peak and rows) and writes the command, the provenance line
and the table, so every number on the page is what a committed file says. tools/results_tables.py
renders these blocks with its own (`./py tools/results_tables.py`, `--check` in the tests).
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks" / "results"
WIDTHS = (128, 256, 384)  # train_step_width<w>.json
# The train step at width 512, ViT and LM in runs of their own (one run holds every row's state).
REFERENCE = ("train_step_reference", "train_step_reference_lm")


def load(name: str) -> dict:
  return json.loads((BENCH_DIR / f"{name}.json").read_text())


def command(result: dict) -> str:
  """The command line as run from the repository root, wrapped at flags into a Markdown code
  block (./py when tcmalloc was preloaded, as the Makefile runs it)."""
  python = "./py" if "tcmalloc" in result["machine"]["ld_preload"] else ".venv/bin/python"
  units = [""]  # each flag with its values
  for word in f"{python} {result['command']}".split(" "):
    if word.startswith("--"):
      units.append("")
    units[-1] += (" " if units[-1] else "") + word
  lines = [units[0]]
  for unit in units[1:]:
    if len(lines[-1]) + len(unit) > 84:
      lines.append("")
    lines[-1] += (" " if lines[-1] else "") + unit
  return "    " + " \\\n        ".join(lines)


def peak_text(result: dict) -> str:
  size, dtype = result["config"]["peak_size"], result["config"].get("dtype", "float32")
  unit, scale = ("TFLOP/s", 1e12) if result["machine"]["backend"] == "gpu" else ("GFLOP/s", 1e9)
  return f"matmul peak {result['peak_flops'] / scale:.0f} {unit} ({size}^2 {dtype})"


def provenance(result: dict) -> str:
  """'<date> UTC, commit <c>: <machine>; matmul peak ...; load average ...' of one run."""
  machine = result["machine"]
  allocator = "tcmalloc" if "tcmalloc" in machine["ld_preload"] else "glibc's malloc"
  load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
  return (f"{result['date'][:16].replace('T', ' ')} UTC, commit {result['commit']}: "
          f"{machine['processor']}, {machine['cpu_count']} cores, {machine['backend']}, jax "
          f"{machine['jax']}, flax {machine['flax']}, {allocator}; {peak_text(result)}, the best "
          f"sampled between the rows; load average {load} at the end of the run.")


def header(result: dict) -> str:
  return f"{command(result)}\n\n{provenance(result)}\n"


def table(columns: list, rows: list) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def ms(value: float) -> str:
  return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def percent(value: float) -> str:
  return f"{value:.1%}"


def layer_row(row: dict, reference: bool) -> list:
  moe = row["experts"] > 0
  cells = [row["router"], row["path"], row["experts"] if moe else "-",
           row["group_size"] or "-", ms(row["ms"]), percent(row["useful_of_peak"]),
           f"{row['vs_dense']:.2f}"]
  if reference:
    cells.append(f"{row['vs_reference']:.2f}")
  return cells + [f"{row['xla_vs_model']:.2f}", f"{row['temp_mb']:.0f}",
                  f"{row['dropped_fraction']:.3f}"]


def layer_table(name: str) -> str:
  result = load(name)
  reference = any(row["router"] == "dense_ref" for row in result["rows"])
  columns = (["router", "path", "E", "S", "ms", "useful / peak", "x dense"]
             + ["x ref"] * reference + ["XLA / model FLOPs", "temp MB", "dropped"])
  return header(result) + "\n" + table(columns, [layer_row(r, reference) for r in result["rows"]])


def memory_table(name: str = "moe_layer_routers") -> str:
  """The compile-only temp memory of the same run, and how it grows with the tokens."""
  memory = load(name)["memory"]
  rows = [[m["tokens"], m["path"], m["group_size"] or "-", f"{m['temp_mb']:.0f}"]
          for m in memory]
  tokens = sorted({m["tokens"] for m in memory})
  growth = []
  for path in dict.fromkeys(m["path"] for m in memory):
    at = {m["tokens"]: m["temp_mb"] for m in memory if m["path"] == path}
    growth.append(f"{path} {at[tokens[-1]] / at[tokens[0]]:.1f}x")
  return (table(["tokens", "path", "S", "temp MB"], rows) + f"\n\n{tokens[-1] // tokens[0]}x "
          f"the tokens (largest group size): " + ", ".join(growth) + ".")


def malloc_table(tcmalloc: str = "moe_layer_topk_E", glibc: str = "moe_layer_topk_E_glibc") -> str:
  """The same rows with tcmalloc and with glibc's malloc, run one after the other."""
  fast, slow = load(tcmalloc), load(glibc)
  key = lambda row: (row["router"], row["path"], row["experts"], row["group_size"])
  by_key = {key(row): row for row in slow["rows"]}
  rows = [[row["router"], row["path"], row["experts"] or "-", ms(row["ms"]),
           ms(by_key[key(row)]["ms"]), f"{by_key[key(row)]['ms'] / row['ms']:.2f}"]
          for row in fast["rows"] if key(row) in by_key]
  return (f"tcmalloc: the table above. glibc's malloc:\n\n{header(slow)}\n"
          + table(["router", "path", "E", "ms, tcmalloc", "ms, glibc", "glibc / tcmalloc"], rows))


def train_table(name: str, tokens_per_s: bool = True) -> str:
  result = load(name)
  columns = ["config", "path", "ms"] + ["tokens/s"] * tokens_per_s + ["MFU", "x dense"]
  rows = [[row["config"], row["path"], ms(row["ms"])]
          + [f"{row['tokens_per_s']:,.0f}"] * tokens_per_s
          + [percent(row["mfu"]), f"{row['vs_dense']:.2f}"] for row in result["rows"]]
  return header(result) + "\n" + table(columns, rows)


def width_tables() -> str:
  return "\n\n".join(f"Width {w}:\n\n" + train_table(f"train_step_width{w}", tokens_per_s=False)
                     for w in WIDTHS)


def width(result: dict) -> str:
  """The model width a train-step or ceiling run set (--set model.width=W), else the default's."""
  overrides = dict(item.split("=", 1) for item in result["config"]["set"])
  return overrides.get("model.width", "128")


def model_name(config: str) -> str:
  """'vit' of 'configs/vit.py:dense'."""
  return config.split("/")[1].split(".")[0]


def ceiling_table(names=("matmul_ceiling", "matmul_ceiling_width256")) -> str:
  """The matmul chains of the default shapes and at width 256, side by side, and what they leave
  to the rest of the dense train step (train_step.json's dense rows)."""
  results = [load(name) for name in names]
  widths = [width(r) for r in results]
  columns = ["shapes", "part"] + [c for w in widths for c in (f"width {w}: ms", "of peak")]
  parts = [(row["config"], row["part"]) for row in results[0]["rows"]]
  rows = []
  for config, part in parts:
    cells = [model_name(config), part]
    for result in results:
      row = next(r for r in result["rows"] if (r["config"], r["part"]) == (config, part))
      cells += [ms(row["ms"]), percent(row["of_peak"])]
    rows.append(cells)
  chain = {row["config"]: row["of_peak"] for row in results[0]["rows"] if row["part"] == "all"}
  step = {row["config"]: row["mfu"] for row in load("train_step")["rows"]
          if row["config"] in chain}
  sentence = "; ".join(f"{model_name(c)}: matmuls alone {percent(chain[c])}, the dense train "
                       f"step {percent(step[c])}" for c in chain if c in step)
  return ("\n\n".join(header(r) for r in results) + "\n" + table(columns, rows)
          + f"\n\nAt the default shapes (width 128) against the default-configs table: {sentence}.")


def targets_table() -> str:
  """Issue #7's targets, each against the numbers of the tables below."""
  layer = load("moe_layer_topk_E")["rows"]
  moe = [row for row in layer if row["experts"]]
  best8 = max((row for row in moe if row["experts"] == 8), key=lambda r: r["useful_of_peak"])
  dense = next(row for row in layer if row["router"] == "dense")
  fastest = {e: min((r for r in moe if r["experts"] == e), key=lambda r: r["ms"]) for e in (8, 64)}
  growth = {}
  for row in moe:
    if row["experts"] == 64:
      at8 = next(r for r in moe if (r["path"], r["experts"]) == (row["path"], 8))
      growth[row["path"]] = row["ms"] / at8["ms"]
  fastest_growth = growth[fastest[64]["path"]]
  mfu = {}
  for name in [f"train_step_width{w}" for w in WIDTHS] + list(REFERENCE):
    result = load(name)
    for row in result["rows"]:
      if row["config"].endswith((":dense", ":topk")):
        mfu.setdefault(width(result), []).append(row["mfu"])
  widths_met = [w for w, values in mfu.items() if min(values) >= 0.5]
  memory = load("moe_layer_routers")["memory"]
  tokens = sorted({m["tokens"] for m in memory})
  linear = {}
  for path in ("index", "dropless"):
    at = {(m["tokens"], m["group_size"]): m["temp_mb"] for m in memory if m["path"] == path}
    sizes = {s for _, s in at}
    same_s = all(len({at[t, s] for s in sizes}) == 1 for t in tokens)
    linear[path] = (at[tokens[-1], max(sizes)] / at[tokens[0], max(sizes)], same_s)
  ratio = tokens[-1] // tokens[0]
  rows = [
      ["fastest path forward+backward >= 75% of the matmul peak in useful FLOPs (E = 8)",
       f"{best8['path']}: {percent(best8['useful_of_peak'])}; moe-jax's dense FFN "
       f"{percent(dense['useful_of_peak'])}",
       "yes" if best8["useful_of_peak"] >= 0.75 else "no"],
      ["fastest path <= 0.8x the time of the dense FFN of equal active FLOPs",
       "; ".join(f"E = {e}, {r['path']}: {r['vs_reference']:.2f}x the reference FFN, "
                 f"{r['vs_dense']:.2f}x moe-jax's" for e, r in fastest.items()),
       "against the reference FFN " + ("yes" if fastest[8]["vs_reference"] <= 0.8 else "no")
       + "; against moe-jax's, " + ("yes" if fastest[8]["vs_dense"] <= 0.8 else "no")],
      ["step time E = 8 -> 64 <= 1.3x (topk, fixed active FLOPs and tokens)",
       ", ".join(f"{path} {value:.2f}x" for path, value in growth.items()),
       f"{fastest[64]['path']} (the fastest at E = 64): "
       + ("yes" if fastest_growth <= 1.3 else "no")],
      ["full train step MFU >= 50% of the peak (ViT and LM, dense and topk)",
       "; ".join(f"width {w}: {percent(min(v))}-{percent(max(v))}" for w, v in mfu.items()),
       ("from width " + min(widths_met, key=int) + " up" if widths_met else "at no width")],
      ["index/dropless peak memory linear in tokens, not tokens x S",
       "; ".join(f"{path}: {growth:.1f}x for {ratio}x the tokens, "
                 + ("the same" if same else "not the same") + " at every S"
                 for path, (growth, same) in linear.items()),
       "yes" if all(g <= ratio * 1.1 and same for g, same in linear.values()) else "no"],
  ]
  return table(["target", "measured (tables below)", "met?"], rows)


BLOCKS = {"bench-targets": targets_table,
          "bench-layer-experts": lambda: layer_table("moe_layer_topk_E"),
          "bench-malloc": malloc_table,
          "bench-layer-routers": lambda: layer_table("moe_layer_routers"),
          "bench-layer-memory": memory_table,
          "bench-train-default": lambda: train_table("train_step"),
          "bench-train-reference": lambda: "\n\n".join(map(train_table, REFERENCE)),
          "bench-train-width": width_tables,
          "bench-ceiling": ceiling_table}
