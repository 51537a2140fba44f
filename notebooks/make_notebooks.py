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
# Sweep analysis

The members of a sweep (`python -m experiments.sweep --sweep ... --workdir SWEEP_DIR`) side by
side: final quality with its spread over seeds, loss curves, quality against throughput, dropped
tokens and how evenly the experts are loaded. Members that differ only by `seed` form a group.
Rerun any time: unfinished members are listed and left out."""),
    ("parameters", """\
sweep_dir = "runs/routers"  # the sweep's workdir: sweep.json and one run directory per member"""),
    ("code", """\
import itertools
import math
import textwrap

import matplotlib.pyplot as plt
import pandas as pd

from moe_jax import analysis

table = analysis.sweep_table(sweep_dir)
finished = table[table.status == "finished"]
colors = dict(zip(finished.group.unique(), itertools.cycle(plt.cm.tab10.colors)))
print(f"{len(finished)} of {len(table)} members finished")
table[["name", "group", "status", "error"]]"""),
    ("markdown", """\
## Comparison

Mean over the finished members of each group; `std` columns are the spread over seeds (NaN for a
single member). Routing statistics come from the last train record, averaged over MoE layers."""),
    ("code", """\
if finished.empty:
  raise ValueError(f"no member of {sweep_dir} has finished yet")
analysis.sweep_summary(table).round(4)"""),
    ("markdown", """\
## Loss curves

Task cross-entropy (without the auxiliary losses); one line per member, one color per group."""),
    ("code", """\
curves = pd.concat([analysis.loss_curves(run_dir).assign(group=group, member=name)
                    for run_dir, group, name in zip(finished.run_dir, finished.group,
                                                    finished.name)])
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for (group, _), run in curves.groupby(["group", "member"], sort=False):
  for ax, split in zip(axes, ["train", "eval"]):
    part = run[run.split == split]
    ax.plot(part.step, part.loss, marker="o" if split == "eval" else None,
            color=colors[group], label=group)
for ax, split in zip(axes, ["train", "eval"]):
  ax.set(title=f"{split} loss", xlabel="step", ylabel="cross-entropy")
legend = dict(zip(*axes[0].get_legend_handles_labels()[::-1]))  # one entry per group
axes[1].legend(legend.values(), legend.keys());"""),
    ("markdown", """\
## Quality vs throughput

Final eval accuracy against training throughput (tokens/s without the first, compiling,
interval); one point per member."""),
    ("code", """\
fig, ax = plt.subplots(figsize=(6, 4))
for group, rows in finished.groupby("group", sort=False):
  ax.scatter(rows.tokens_per_s, rows["eval/accuracy"], color=colors[group], label=group)
ax.set(xlabel="train tokens/s", ylabel="eval accuracy", title="quality vs throughput")
ax.legend();"""),
    ("markdown", """\
## Dropped tokens

Share of the routers' choices that found no capacity (last train record). Against the capacity
factor when the sweep varies it, else per group."""),
    ("code", """\
moe = finished[finished.dropped_fraction.notna()]  # dense members route nothing
factor = "model.moe.capacity_factor"
fig, ax = plt.subplots(figsize=(6, 4))
if factor in moe and moe[factor].nunique() > 1:
  keys = [key for key in analysis.sweep_overrides(sweep_dir)
          if key != "seed" and not key.endswith("capacity_factor")]
  for line, rows in moe.groupby(analysis.group_labels(moe, keys), sort=False):
    drops = rows.groupby(factor).dropped_fraction.mean()  # mean over seeds
    ax.plot(drops.index, drops.to_numpy(), marker="o", label=line)
  ax.set(xlabel="capacity factor", ylabel="dropped fraction")
  ax.legend()
else:
  drops = moe.groupby("group", sort=False).dropped_fraction.agg(["mean", "std"])
  ax.bar(drops.index, drops["mean"], yerr=drops["std"].fillna(0),
         color=[colors[group] for group in drops.index])
  ax.set(ylabel="dropped fraction (mean, std over seeds)")
  ax.tick_params(axis="x", rotation=30)"""),
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
vmax = max((matrix.to_numpy().max() for matrix in loads.values()), default=1.0)  # one scale
columns = min(max(len(loads), 1), 4)
fig, axes = plt.subplots(math.ceil(max(len(loads), 1) / columns), columns, squeeze=False,
                         figsize=(4 * columns + 1, 3 * math.ceil(len(loads) / columns)),
                         layout="constrained")
for ax, (group, matrix) in zip(axes.flat, loads.items()):
  image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
  ax.set(xlabel="expert", ylabel="layer", xticks=range(matrix.shape[1]),
         yticks=range(len(matrix)), yticklabels=matrix.index)
  ax.set_title(textwrap.fill(group, 32), fontsize="small")
for ax in axes.flat[len(loads):]:
  ax.axis("off")
if loads:
  fig.colorbar(image, ax=axes, label="share of choices")"""),
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
  ax.bar(rows.num_assigned + i * width, rows.fraction, width, label=f"layer {layer}")
ax.set(xlabel="experts that processed the token", ylabel="share of tokens",
       title="coverage at evaluation capacity")
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
