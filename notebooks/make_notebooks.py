"""Writes the analysis notebooks of this folder from the cells below (the notebooks are outputs:
edit here, then run `python notebooks/make_notebooks.py`; tests/test_notebooks.py checks that
they match).

  analyze_sweep.ipynb     a sweep's members compared (parameter sweep_dir)
  routing_analysis.ipynb  one run's routing (parameter run_dir)

Run one with papermill, its parameters given with -p, then export it to HTML:
  papermill notebooks/analyze_sweep.ipynb runs/routers/analysis.ipynb -p sweep_dir runs/routers
  jupyter nbconvert --to html --no-input runs/routers/analysis.ipynb
"""
import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

ANALYZE_SWEEP = [
    ("markdown", """\
# Sweep report

A sweep's groups (members that differ only by `seed`) against its baseline group: the answer
first, in sentences (warnings folded below them), then as a table, then loss curves, the
routers' learning, quality against training time and FLOPs, dropped tokens and expert load.
Rerun any time: unfinished members are named and left out."""),
    ("parameters", """\
sweep_dir = "runs/routers"  # the sweep's workdir: sweep.json and one run directory per member"""),
    ("code", """\
import itertools
import math
import os
import textwrap

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from IPython.display import HTML, Markdown, display
from matplotlib import colors, transforms

from moe_jax import analysis, compare, sweep

table = analysis.sweep_table(sweep_dir)
finished = table[table.status == "finished"]
if finished.empty:
  raise ValueError(f"no member of {sweep_dir} has finished yet")
definition = analysis.sweep_definition(sweep_dir)
summary = sweep.summarize(table, definition)  # contended members' times left out
speed = sweep.relative_speed(table, definition)
baseline = summary.baseline.iloc[0]
quality = analysis.quality_metrics(table)
colors_of = dict(zip(table.group.unique(), itertools.cycle(plt.cm.tab10.colors)))
moe = finished[finished.dropped_fraction.notna()]  # dense members route nothing"""),
    ("code", """\
sentences = analysis.report_sentences(table, summary, speed, quality[:1])  # the headline metric
display(Markdown("\\n".join(f"- {sentence}" for sentence in sentences)))
warnings = analysis.report_warnings(table)
if warnings:
  display(HTML(warnings))"""),
    ("markdown", """\
## Comparison

Per group: the final eval metrics, mean over seeds with its 95% t-interval; the difference to
the baseline, paired by seed, with its interval and verdict (better or worse when the interval
excludes 0; moe_jax/compare.py); and tokens/s, each member's median over its steady-state log
intervals (compilation and evaluation excluded), as a multiple of the baseline's (the geometric
mean of the per-seed ratios). Members whose CPU share was far from the sweep's (contended, in
the warnings above) are left out of the speeds. Dropped: the share of the routers' choices that
found no capacity."""),
    ("code", """\
display(HTML(analysis.table_html(analysis.comparison_table(table, summary, speed, quality))))"""),
    ("markdown", """\
## Domains

On data with domain labels: each group's eval bits per byte per domain (mean over seeds; the
macro mean weighs every domain alike), and where they were computed, the groups placed between
the brackets of routing (`python -m experiments.headroom`: the share of the random-to-domain gap
closed, Fieller's 95% interval) and their specialization by domain and routing saturation
(`python -m experiments.specialization`)."""),
    ("code", """\
per_domain = [c for c in finished if c.startswith("eval/bits_per_byte/")]
if not per_domain:
  display(Markdown("The sweep's data has no domain labels."))
else:
  domains = finished.groupby("group", sort=False)[per_domain + ["eval/bits_per_byte_macro"]]
  domains = domains.mean().rename(columns=lambda c: c.split("/")[-1])
  as_text = lambda frame: frame.map(lambda v: compare.significant(v) if isinstance(v, float)
                                    else str(v))  # table_html takes strings
  display(HTML(analysis.table_html(as_text(domains.reset_index()))))
  for name in ("headroom.csv", "specialization.csv"):
    path = os.path.join(sweep_dir, name)
    if os.path.exists(path):
      display(Markdown(f"`{name}`:"), HTML(analysis.table_html(as_text(pd.read_csv(path)))))"""),
    ("markdown", """\
Which experts each domain's tokens use: per MoE group, its lowest seed's last checkpoint, the
share of each domain's tokens whose top-1 expert is e in the last MoE layer (2 evaluation
batches; the routing notebook draws every layer of one run)."""),
    ("code", """\
if per_domain and not moe.empty:
  firsts = moe.sort_values("seed").groupby("group", sort=False).head(1)
  maps = []
  for member in firsts.itertuples():
    decisions = analysis.routing_decisions(member.run_dir, num_batches=2)
    layer = int(decisions.layer.max())
    maps.append((f"{member.group}, seed {member.seed}: layer {layer}",
                 analysis.class_expert_table(decisions, layer, by="domain", normalize="label")))
  columns = min(4, len(maps))
  fig, axes = plt.subplots(math.ceil(len(maps) / columns), columns, squeeze=False,
                           figsize=(4.2 * columns + 1, 3.2 * math.ceil(len(maps) / columns)),
                           layout="constrained")
  for ax, (title, shares) in zip(axes.flat, maps):
    image = ax.imshow(shares, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set(title=title, xlabel="top-1 expert", yticks=range(len(shares)),
           yticklabels=shares.index)
  for ax in axes.flat[len(maps):]:
    ax.axis("off")
  fig.colorbar(image, ax=axes.ravel().tolist(), label="P(top-1 expert | domain)")"""),
    ("markdown", """\
## Loss curves

Task cross-entropy (without the auxiliary losses): per group the mean over seeds (line) and the
lowest to highest seed (band). Evaluations are drawn where a group has three or more; fewer are
a table."""),
    ("code", """\
curves = analysis.group_loss_curves(table)
evals = curves[curves.split == "eval"]
drawn = ["train", "eval"] if len(evals) and evals.groupby("group").step.nunique().max() >= 3 \\
    else ["train"]
fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn), 3.8), sharey=True,
                         squeeze=False, layout="constrained")
for ax, split in zip(axes[0], drawn):
  for group, rows in curves[curves.split == split].groupby("group", sort=False):
    ax.plot(rows.step, rows["mean"], color=colors_of[group], label=group,
            marker="o" if split == "eval" else None)
    ax.fill_between(rows.step, rows.low, rows.high, color=colors_of[group], alpha=0.2,
                    linewidth=0)
  ax.set(title=f"{split} loss", xlabel="step", ylabel="cross-entropy")
if analysis.spans_decades(curves["mean"]):
  axes[0, 0].set_yscale("log")  # shared by both panels
axes[0, -1].legend()
plt.show()
if len(evals) and drawn == ["train"]:
  display(Markdown("Eval loss (cross-entropy; mean over seeds, lowest to highest seed in "
                   "parentheses):"))
  display(HTML(analysis.table_html(analysis.eval_table(curves))))"""),
    ("markdown", """\
## Does the router learn?

Router entropy (nats; ln E, dashed, is a router that routes uniformly, almost at random) and the
mean top-1 probability (1/E uniform) over training, per group: mean over MoE layers and seeds.
A router that stays near ln E has not learned to tell tokens apart."""),
    ("code", """\
if moe.empty:
  display(Markdown("No MoE member: nothing routes."))
else:
  routing = pd.concat([analysis.routing_metrics(run_dir).assign(group=group)
                       for run_dir, group in zip(moe.run_dir, moe.group)])
  routing_curves = routing.groupby(["group", "step"], sort=False)[
      ["router_entropy", "top1_confidence", "entropy_max"]].mean().reset_index()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
  for group, rows in routing_curves.groupby("group", sort=False):
    axes[0].plot(rows.step, rows.router_entropy, color=colors_of[group], label=group)
    axes[0].axhline(rows.entropy_max.iloc[0], color=colors_of[group], linestyle="--",
                    linewidth=1)
    axes[1].plot(rows.step, rows.top1_confidence, color=colors_of[group], label=group)
  axes[0].set(title="router entropy (dashed: ln E)", xlabel="step", ylabel="nats")
  axes[1].set(title="top-1 probability", xlabel="step", ylim=(0, None))
  axes[1].legend()
  plt.show()"""),
    ("markdown", """\
## Quality against training time and FLOPs

The final metric per group, mean with its 95% interval (error bars), at the group's mean
training time (the sum of its train-step intervals: compilation included; evaluation and
checkpoints not; contended members left out) and training FLOPs (3 x the model's FLOPs per
token, forward and backward, x the tokens trained). Groups at about the same cost are drawn a
few pixels apart so that their bars do not hide each other. Each bar is one group's spread over
seeds; two groups' bars can overlap while their paired difference (the table above) excludes 0,
since pairing by seed cancels what the seeds share."""),
    ("code", """\
metric = quality[0]
rows = summary[summary.metric == metric].set_index("group").loc[finished.group.unique()]
cost = sweep.uncontended(finished).groupby("group", sort=False)[["wall_seconds", "train_flops"]]
cost = cost.mean()
untimed = list(cost.index[cost.wall_seconds.isna()])
panels = [(column, label) for column, label in [("wall_seconds", "training time (s)"),
                                                ("train_flops", "training FLOPs")]
          if cost[column].notna().any()]
fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), sharey=True,
                         squeeze=False, layout="constrained")
low = rows.ci_low.fillna(rows["mean"]).min()
high = rows.ci_high.fillna(rows["mean"]).max()
for ax, (column, label) in zip(axes[0], panels):
  x = cost[column].dropna()
  log = analysis.spans_decades(x)
  scaled = np.log10(x) if log else x
  # Drawn in points beside their value, so the axis limits are set here, not autoscaled.
  offsets = analysis.dodge(scaled, spacing=12)  # points: wider than two caps
  for (group, value), offset in zip(x.items(), offsets):
    row = rows.loc[group]
    ax.errorbar(value, row["mean"], color=colors_of[group], label=group, marker="o", capsize=4,
                yerr=[[row["mean"] - row.ci_low], [row.ci_high - row["mean"]]]
                if math.isfinite(row.ci_low) else None,
                transform=transforms.offset_copy(ax.transData, fig=fig, x=offset, units="points"))
  pad = 0.3 * (np.ptp(scaled) or 0.05 * abs(scaled.max()) or 1)
  limits = np.array([scaled.min() - pad, scaled.max() + pad])
  ax.set(xlabel=label, xscale="log" if log else "linear", xlim=10 ** limits if log else limits)
  if not log:  # few ticks: the FLOP counts are long labels
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
  if column == "train_flops":
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(unit="FLOP"))
  ax.set_title(f"final eval {compare.metric_name(metric)} against {label.split(' (')[0]}")
margin = 0.1 * ((high - low) or abs(high) or 1)
axes[0, 0].set(ylabel=f"eval {compare.metric_name(metric)}", ylim=(low - margin, high + margin))
axes[0, -1].legend()
plt.show()
if untimed:
  display(Markdown(
      "Training time is not plotted: every member ran contended (see the warnings), so the "
      "times measure the machine, not the router." if len(untimed) == len(cost) else
      f"Left out of the training time: {', '.join(untimed)}, whose members all ran contended "
      "(see the warnings)."))"""),
    ("markdown", """\
## Dropped tokens

Share of the routers' choices that found no capacity (last train record). Against the capacity
factor when the sweep varies it, else per group (mean, error bars the lowest to highest seed)."""),
    ("code", """\
factor = "model.moe.capacity_factor"
if moe.empty:
  display(Markdown("No MoE member: nothing routes, so nothing is dropped."))
elif not (moe.dropped_fraction > 0).any():
  display(Markdown("No router dropped a choice: every expert had the capacity for its tokens."))
elif factor in moe and moe[factor].nunique() > 1:
  keys = [key for key in analysis.sweep_overrides(sweep_dir)
          if key != "seed" and not key.endswith("capacity_factor")]
  fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
  for line, rows in moe.groupby(analysis.group_labels(moe, keys), sort=False):
    drops = rows.groupby(factor).dropped_fraction.mean()  # mean over seeds
    ax.plot(drops.index, drops.to_numpy(), marker="o", label=line)
  ax.set(xlabel="capacity factor", ylabel="dropped fraction",
         yscale="log" if analysis.spans_decades(moe.dropped_fraction) else "linear")
  ax.legend()
  plt.show()
else:
  drops = moe.groupby("group", sort=False).dropped_fraction.agg(["mean", "min", "max"])
  fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(drops) + 2), 3.8), layout="constrained")
  ax.bar(drops.index, drops["mean"], color=[colors_of[group] for group in drops.index],
         yerr=[drops["mean"] - drops["min"], drops["max"] - drops["mean"]], width=0.6)
  ax.set(ylabel="dropped fraction", xlim=(-0.7, len(drops) - 0.3),
         yscale="log" if analysis.spans_decades(drops["min"]) else "linear")
  ax.tick_params(axis="x", rotation=30)
  plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
  plt.show()"""),
    ("markdown", """\
## Expert load

Each expert's load over its layer's mean load: its share of the router's choices in the last
train record, mean over seeds, x the number of experts. 1 (white) is perfect balance; red
experts get more than their share, blue ones less (0: an expert nobody chose)."""),
    ("code", """\
def final_load(run_dir):
  load = analysis.expert_load(run_dir)
  return load[load.step == load.step.max()]

loads = {}
for group, rows in moe.groupby("group", sort=False):
  load = pd.concat([final_load(run_dir) for run_dir in rows.run_dir])
  matrix = load.pivot_table(index="layer", columns="expert", values="load")
  loads[group] = matrix.div(matrix.mean(axis=1), axis=0)
if not loads:
  display(Markdown("No MoE member: no expert load."))
else:
  # One scale for all, diverging at 1: below it blue down to 0, above it red up to the most
  # loaded expert (at least 2, so that a balanced sweep stays pale).
  norm = colors.TwoSlopeNorm(vmin=0, vcenter=1,
                             vmax=max(2, *(matrix.to_numpy().max() for matrix in loads.values())))
  columns = min(len(loads), 3)  # at most 10 inches wide: shown at full size, labels readable
  lines = math.ceil(len(loads) / columns)
  fig, axes = plt.subplots(lines, columns, squeeze=False, layout="constrained",
                           figsize=(3.2 * columns + 0.8, 2.4 * lines + 0.4))
  for ax, (group, matrix) in zip(axes.flat, loads.items()):
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto")
    experts = matrix.shape[1]
    ax.set(xlabel="expert", ylabel="layer", xticks=range(0, experts, math.ceil(experts / 8)),
           yticks=range(len(matrix)), yticklabels=matrix.index)
    ax.set_title(textwrap.fill(group, 30))
  for ax in axes.flat[len(loads):]:
    ax.axis("off")
  fig.colorbar(image, ax=axes, label="load / mean load")
  plt.show()"""),
]

ROUTING_ANALYSIS = [
    ("markdown", """\
# Routing analysis of one run

How the routers of a MoE run behave: expert load and router entropy over training (from
`metrics.jsonl`), then, from its checkpoints, which experts the classes (ViT) or byte classes
(LM) go to, how far routing moved between the first and last checkpoint, how many experts each
token got, and how top-1 experts follow each other across layers."""),
    ("parameters", """\
run_dir = "runs/vit_switch"  # a training run's workdir
num_batches = 4  # evaluation batches whose tokens are analysed"""),
    ("code", """\
import matplotlib.pyplot as plt

from moe_jax import analysis

run = analysis.load_run(run_dir)
layers = sorted(run.moe_layers)
if not layers:
  raise ValueError(f"{run_dir} is a dense model: there is no routing to analyse")
print(f"{run.config.model.name} with router {run.config.model.moe.router!r}, MoE layers {layers}, "
      f"checkpoints at steps {run.checkpoint_steps}")
print("final eval:", run.final["eval"] if run.final else "not finished")"""),
    ("markdown", """\
## Expert load over training

Each expert's share of the router's choices (before capacity), averaged over each logging
interval."""),
    ("code", """\
load = analysis.expert_load(run_dir)
fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.5), squeeze=False,
                         sharey=True)
for ax, layer in zip(axes[0], layers):
  shares = load[load.layer == layer].pivot(index="step", columns="expert", values="load")
  ax.stackplot(shares.index, shares.T.to_numpy(), labels=shares.columns)
  ax.set(title=f"layer {layer}", xlabel="step", ylabel="share of choices", ylim=(0, 1))
axes[0, -1].legend(title="expert", bbox_to_anchor=(1.02, 1), loc="upper left");"""),
    ("markdown", """\
## Router entropy vs ln E

Mean entropy of the router's distribution per token; ln E (dashed) is a uniform router, 0 a
certain one. Next to it, the share of choices dropped for lack of capacity."""),
    ("code", """\
metrics = analysis.routing_metrics(run_dir)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for layer, rows in metrics.groupby("layer"):
  axes[0].plot(rows.step, rows.router_entropy, label=f"layer {layer}")
  axes[1].plot(rows.step, rows.dropped_fraction, label=f"layer {layer}")
for entropy_max in metrics.entropy_max.unique():
  axes[0].axhline(entropy_max, color="gray", linestyle="--", label=f"ln E = {entropy_max:.2f}")
axes[0].set(title="router entropy", xlabel="step", ylabel="nats",
            ylim=(0, 1.05 * metrics.entropy_max.max()))
axes[1].set(title="dropped fraction", xlabel="step")
axes[0].legend();"""),
    ("markdown", """\
## Load spread, dead experts and collapse

The load monitor's summary per layer (moe_jax/monitor.py): the least, 10th, 50th and 90th
percentile and most loaded expert as multiples of the mean load (1 is perfect balance), and the
experts that stayed under `train.dead_expert_load` of the mean for `train.monitor_patience`
records (dead), with the records where one expert held more than `train.collapse_expert_share`
of the choices that long (collapsed)."""),
    ("code", """\
fig, axes = plt.subplots(1, len(layers) + 1, figsize=(5 * len(layers) + 5, 3.5), squeeze=False)
for ax, (layer, rows) in zip(axes[0], metrics.groupby("layer")):
  ax.fill_between(rows.step, rows.load_min, rows.load_max, alpha=0.2, label="min to max")
  ax.fill_between(rows.step, rows.load_p10, rows.load_p90, alpha=0.4, label="10th to 90th")
  ax.plot(rows.step, rows.load_p50, label="median")
  ax.axhline(1, color="gray", linestyle="--")
  ax.set(title=f"layer {layer}: load / mean load", xlabel="step")
  axes[0, -1].plot(rows.step, rows.dead_experts, label=f"layer {layer}")
axes[0, 0].legend()
axes[0, -1].set(title="dead experts", xlabel="step")
axes[0, -1].legend()
collapsed = metrics[metrics.collapsed == 1]
print("collapsed:", "never" if collapsed.empty else
      ", ".join(f"layer {r.layer} at step {r.step} (expert {r.top_expert:.0f})"
                for r in collapsed.itertuples()))"""),
    ("markdown", """\
## Specialization

Routing decisions of the last checkpoint on the first `num_batches` evaluation batches. Mutual
information between a token's top-1 expert and its label (nats; normalized by the smaller of the
two entropies: 0 independent, 1 one determines the other), and the share of each label's tokens
that each expert gets (-1: tokens no expert took, expert choice only)."""),
    ("code", """\
decisions = analysis.routing_decisions(run_dir, num_batches=num_batches)
analysis.specialization(decisions).round(4)"""),
    ("code", """\
fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers) + 2, 4), squeeze=False,
                         layout="constrained")
for ax, layer in zip(axes[0], layers):
  table = analysis.class_expert_table(decisions, layer, normalize="label")
  image = ax.imshow(table, cmap="magma", vmin=0, vmax=1, aspect="auto")
  ax.set(title=f"layer {layer}: P(top-1 expert | label)", xlabel="top-1 expert",
         xticks=range(table.shape[1]), xticklabels=table.columns,
         yticks=range(len(table)), yticklabels=table.index)
fig.colorbar(image, ax=axes[0].tolist());"""),
    ("markdown", """\
## Domains

On data with domain labels (multidomain_bytes): which experts each domain's tokens use (the
share of a domain's tokens whose top-1 expert is e, per layer, as in the Mixtral and OLMoE
papers), and the normalized mutual information between domain and top-1 expert (1 for the
domain router with one expert per domain; 0 when the expert says nothing of the domain)."""),
    ("code", """\
if "domain" in decisions:
  display(analysis.specialization(decisions, by="domain").round(4))
  fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers) + 2, 4), squeeze=False,
                           layout="constrained")
  for ax, layer in zip(axes[0], layers):
    table = analysis.class_expert_table(decisions, layer, by="domain", normalize="label")
    image = ax.imshow(table, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set(title=f"layer {layer}: P(top-1 expert | domain)", xlabel="top-1 expert",
           xticks=range(table.shape[1]), xticklabels=table.columns,
           yticks=range(len(table)), yticklabels=table.index)
  fig.colorbar(image, ax=axes[0].tolist())
else:
  print("the run's data has no domain labels")"""),
    ("markdown", """\
## Routing saturation over checkpoints

For the same tokens at every checkpoint: the share of each token's top-k that is also its top-k
at the last checkpoint (OLMoE's routing saturation: 1 once routing is fixed), and the share whose
top-1 expert already is the final one."""),
    ("code", """\
saturation = analysis.routing_saturation(run_dir, num_batches=num_batches)
display(saturation.round(4))
if saturation.step.nunique() > 1:
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for layer, rows in saturation.groupby("layer"):
    ax.plot(rows.step, rows.saturation, marker="o", label=f"layer {layer}")
  ax.set(xlabel="checkpoint step", ylabel="share of top-k kept", ylim=(0, 1.02),
         title="routing saturation")
  ax.legend()"""),
    ("markdown", """\
## Coverage and layer transitions

How many experts processed each token at evaluation capacity (top-k: k unless dropped; expert
choice: anything from 0 to E), and P(top-1 expert in the next MoE layer | top-1 expert in this
one)."""),
    ("code", """\
coverage = analysis.expert_choice_coverage(decisions)
fig, ax = plt.subplots(figsize=(6, 3.5))
width = 0.8 / len(layers)
for i, (layer, rows) in enumerate(coverage.groupby("layer")):
  ax.bar(rows.num_assigned + (i - (len(layers) - 1) / 2) * width, rows.fraction, width,
         label=f"layer {layer}")
counts = range(coverage.num_assigned.min(), coverage.num_assigned.max() + 1)
ax.set(xlabel="experts that processed the token", ylabel="share of tokens",
       title="coverage at evaluation capacity", xticks=counts)  # whole counts only
ax.legend();"""),
    ("code", """\
pairs = list(zip(layers, layers[1:]))
if pairs:
  fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs) + 1, 4), squeeze=False,
                           layout="constrained")
  for ax, (a, b) in zip(axes[0], pairs):
    transitions = analysis.layer_transitions(decisions, a, b, normalize="row")
    image = ax.imshow(transitions, cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"P(expert in layer {b} | expert in layer {a})",
           xlabel=f"layer {b} top-1", ylabel=f"layer {a} top-1",
           xticks=range(transitions.shape[1]), xticklabels=transitions.columns,
           yticks=range(len(transitions)), yticklabels=transitions.index)
  fig.colorbar(image, ax=axes[0].tolist())
else:
  print("one MoE layer: no transitions")"""),
]

NOTEBOOKS = {"analyze_sweep.ipynb": ANALYZE_SWEEP, "routing_analysis.ipynb": ROUTING_ANALYSIS}


def build(cells) -> nbformat.NotebookNode:
  """A notebook of (kind, source) cells; kind 'parameters' is a code cell tagged for papermill.
  Cell ids are their positions, so the output is the same every time."""
  notebook = v4.new_notebook(metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"}})
  for index, (kind, source) in enumerate(cells):
    if kind == "markdown":
      notebook.cells.append(v4.new_markdown_cell(source, id=f"cell-{index}"))
    else:
      tags = {"tags": ["parameters"]} if kind == "parameters" else {}
      notebook.cells.append(v4.new_code_cell(source, id=f"cell-{index}", metadata=tags))
  nbformat.validate(notebook)
  return notebook


def main():
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(cells), os.path.join(HERE, name))


if __name__ == "__main__":
  main()
