#!/bin/sh
# The project's Python, as every make target runs it: .venv's interpreter (make setup creates it)
# with tcmalloc preloaded (XLA:CPU runs slower with glibc's malloc: BENCHMARKS.md says how much).
#   ./py -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch
here=$(dirname "$0")
if [ ! -x "$here/.venv/bin/python" ]; then
  echo "No $here/.venv yet: run 'make setup' first (as root: it installs Debian packages)" >&2
  exit 1
fi
tcmalloc=$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)
LD_PRELOAD="$tcmalloc${LD_PRELOAD:+:$LD_PRELOAD}" exec "$here/.venv/bin/python" "$@"
