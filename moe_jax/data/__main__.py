"""python -m moe_jax.data [--json PATH]: the sizes of multidomain_bytes's default corpus (built
if needed) as a Markdown table; with --json also the file docs/DATA.md's table is generated from
(results/corpus.json, rendered by tools/results_tables.py)."""
import argparse
import json
import platform

import ml_collections

from moe_jax.data import multidomain, sources

parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
parser.add_argument("--json", metavar="PATH", help="write the sizes there as JSON")
args = parser.parse_args()
corpus = sources.open_dataset(ml_collections.ConfigDict({"name": "multidomain_bytes"}))
sizes = multidomain.corpus_sizes(corpus.builder)
if args.json:
  with open("/etc/debian_version") as f:
    debian = f.read().strip()
  with open(args.json, "w") as f:
    json.dump(sizes | dict(debian=debian, python=platform.python_version()), f, indent=1)
print(f"{sizes['corpus']}: {sizes['description']}\n")
print(multidomain.size_table(sizes))
