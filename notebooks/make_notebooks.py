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

A sweep's groups (members that differ only by `seed`) against its baseline group: first in
sentences, then as a table, then loss curves, quality against training time and FLOPs, dropped
tokens and expert load. Rerun any time: unfinished members are named and left out."""),
    ("parameters", """\
sweep_dir = "runs/routers"  # the sweep's workdir: sweep.json and one run directory per member"""),
    ("code", """\
import itertools
import math
import textwrap

import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd
from IPython.display import HTML, Markdown, display

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
colors = dict(zip(table.group.unique(), itertools.cycle(plt.cm.tab10.colors)))"""),
    ("code", """\
sentences = analysis.report_sentences(table, summary, speed, quality[:1])  # the headline metric
display(Markdown("\\n".join(f"- {sentence}" for sentence in sentences)))"""),
    ("markdown", """\
## Comparison

Per group: the final eval metrics, mean over seeds with its 95% t-interval; the difference to
the baseline, paired by seed, with its interval and verdict (better or worse when the interval
excludes 0; moe_jax/compare.py); and tokens/s, each member's median over its steady-state log
intervals (compilation and evaluation excluded), as a multiple of the baseline's (the geometric
mean of the per-seed ratios). Members whose CPU share was far from the sweep's (contended, named
above) are left out of the speeds. Dropped: the share of the routers' choices that found no capacity."""),
    ("code", """\
display(HTML(analysis.table_html(analysis.comparison_table(table, summary, speed, quality))))"""),
    ("markdown", """\
## Loss curves

Task cross-entropy (without the auxiliary losses): per group the mean over seeds (line) and the
lowest to highest seed (band)."""),
    ("code", """\
curves = analysis.group_loss_curves(table)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
for ax, split in zip(axes, ["train", "eval"]):
  for group, rows in curves[curves.split == split].groupby("group", sort=False):
    ax.plot(rows.step, rows["mean"], color=colors[group], label=group,
            marker="o" if split == "eval" else None)
    ax.fill_between(rows.step, rows.low, rows.high, color=colors[group], alpha=0.2, linewidth=0)
  ax.set(title=f"{split} loss", xlabel="step", ylabel="cross-entropy")
axes[1].legend()
plt.show()"""),
    ("markdown", """\
## Does the router learn?

Router entropy (nats; ln E, dashed, is a router that routes uniformly, almost at random) and the
mean top-1 probability (1/E uniform) over training, per group: mean over MoE layers and seeds.
A router that stays near ln E has not learned to tell tokens apart."""),
    ("code", """\
moe_runs = finished[finished.dropped_fraction.notna()]
if moe_runs.empty:
  display(Markdown("No MoE member: nothing routes."))
else:
  routing = pd.concat([analysis.routing_metrics(run_dir).assign(group=group)
                       for run_dir, group in zip(moe_runs.run_dir, moe_runs.group)])
  routing_curves = routing.groupby(["group", "step"], sort=False)[
      ["router_entropy", "top1_confidence", "entropy_max"]].mean().reset_index()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
  for group, rows in routing_curves.groupby("group", sort=False):
    axes[0].plot(rows.step, rows.router_entropy, color=colors[group], label=group)
    axes[0].axhline(rows.entropy_max.iloc[0], color=colors[group], linestyle="--", linewidth=1)
    axes[1].plot(rows.step, rows.top1_confidence, color=colors[group], label=group)
  axes[0].set(title="router entropy (dashed: ln E)", xlabel="step", ylabel="nats")
  axes[1].set(title="top-1 probability", xlabel="step", ylim=(0, None))
  axes[1].legend()
  plt.show()"""),
    ("markdown", """\
## Quality against training time and FLOPs

The final metric per group, mean with its 95% interval (error bars), at the group's mean
training time (the sum of its train-step intervals: compilation included; evaluation and
checkpoints not; contended members left out) and training FLOPs (3 x the model's FLOPs per
token, forward and backward, x the tokens trained). Each bar is one group's spread over seeds;
two groups' bars can overlap while their paired difference (the table above) excludes 0, since
pairing by seed cancels what the seeds share."""),
    ("code", """\
metric = quality[0]
rows = summary[summary.metric == metric].set_index("group").loc[finished.group.unique()]
cost = sweep.uncontended(finished).groupby("group", sort=False)[["wall_seconds", "train_flops"]]
cost = cost.mean()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
for ax, column, label in zip(axes, ["wall_seconds", "train_flops"],
                             ["training time (s)", "training FLOPs"]):
  for group, row in rows.iterrows():
    interval = [[row["mean"] - row.ci_low], [row.ci_high - row["mean"]]]
    ax.errorbar(cost.loc[group, column], row["mean"], color=colors[group], label=group,
                yerr=interval if math.isfinite(row.ci_low) else None, marker="o", capsize=4)
  # From 0: routers at equal active FLOPs differ only by their routers' few FLOPs. (Runs from
  # before wall_seconds was recorded have none: NaN.)
  right = cost[column].max()
  ax.set(xlabel=label, ylabel=f"eval {compare.metric_name(metric)}",
         xlim=(0, 1.1 * right if right > 0 else None))
axes[1].xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(unit="FLOP"))
axes[0].set_title(f"final eval {compare.metric_name(metric)} against training time")
axes[1].set_title("... against training FLOPs")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")
plt.show()"""),
    ("markdown", """\
## Dropped tokens

Share of the routers' choices that found no capacity (last train record). Against the capacity
factor when the sweep varies it, else per group (mean, error bars the lowest to highest seed)."""),
    ("code", """\
moe = finished[finished.dropped_fraction.notna()]  # dense members route nothing
factor = "model.moe.capacity_factor"
fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
if factor in moe and moe[factor].nunique() > 1:
  keys = [key for key in analysis.sweep_overrides(sweep_dir)
          if key != "seed" and not key.endswith("capacity_factor")]
  for line, rows in moe.groupby(analysis.group_labels(moe, keys), sort=False):
    drops = rows.groupby(factor).dropped_fraction.mean()  # mean over seeds
    ax.plot(drops.index, drops.to_numpy(), marker="o", label=line)
  ax.set(xlabel="capacity factor", ylabel="dropped fraction")
  ax.legend()
else:
  drops = moe.groupby("group", sort=False).dropped_fraction.agg(["mean", "min", "max"])
  ax.bar(drops.index, drops["mean"], color=[colors[group] for group in drops.index],
         yerr=[drops["mean"] - drops["min"], drops["max"] - drops["mean"]])
  ax.set(ylabel="dropped fraction")
  ax.tick_params(axis="x", rotation=30)
plt.show()"""),
    ("markdown", """\
## Expert load

Each expert's share of the router's choices in the last train record, per MoE layer (mean over
seeds); 1/E everywhere is perfect balance."""),
    ("code", """\
def final_load(run_dir):
  load = analysis.expert_load(run_dir)
  return load[load.step == load.step.max()]

loads = {}
for group, rows in moe.groupby("group", sort=False):
  load = pd.concat([final_load(run_dir) for run_dir in rows.run_dir])
  loads[group] = load.pivot_table(index="layer", columns="expert", values="load")
if loads:
  vmax = max(matrix.to_numpy().max() for matrix in loads.values())  # one scale for all
  columns = min(len(loads), 3)  # at most 10 inches wide: shown at full size, labels readable
  lines = math.ceil(len(loads) / columns)
  fig, axes = plt.subplots(lines, columns, squeeze=False, layout="constrained",
                           figsize=(3.2 * columns + 0.8, 2.4 * lines + 0.4))
  for ax, (group, matrix) in zip(axes.flat, loads.items()):
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    experts = matrix.shape[1]
    ax.set(xlabel="expert", ylabel="layer", xticks=range(0, experts, math.ceil(experts / 16)),
           yticks=range(len(matrix)), yticklabels=matrix.index)
    ax.set_title(textwrap.fill(group, 30))
  for ax in axes.flat[len(loads):]:
    ax.axis("off")
  fig.colorbar(image, ax=axes, label="share of choices")
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
## Consistency between the first and last checkpoint

For the same tokens: the share whose top-1 expert is unchanged, and the mean overlap of their
expert sets (top-k overlap / k)."""),
    ("code", """\
steps = run.checkpoint_steps
analysis.routing_consistency(run_dir, steps[0], steps[-1], num_batches=num_batches)"""),
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
