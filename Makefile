# `make run` and `make test` set everything up themselves on a fresh machine (as root):
# Debian's packages (Fashion-MNIST, tcmalloc, and the text of multidomain_bytes: fortunes in five
# languages, the Python documentation's HTML, C headers), a virtualenv in .venv with the pinned
# requirements, moe_jax installed editable. The venv is rebuilt only when requirements.txt or
# setup.py change.
VENV := .venv
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := dataset-fashion-mnist libtcmalloc-minimal4 fortunes fortunes-de fortunes-es \
    fortunes-ru fortunes-zh python3-doc libc6-dev linux-libc-dev
DEBIAN_INSTALLED := $(addprefix /usr/share/doc/,$(DEBIAN_PACKAGES))  # one folder per package
# Every command runs with tcmalloc preloaded: XLA:CPU allocates its large temporaries on every
# step, and glibc hands them back to the system and page-faults them in again (BENCHMARKS.md,
# "tcmalloc against glibc's malloc", measures how much slower that is).
PY := LD_PRELOAD=$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1) $(VENV)/bin/python

.PHONY: run test bench train setup clean

# The main job: does MoE beat the dense model of equal active FLOPs? The byte-level LM on 8
# domains of text and code (multidomain_bytes), dense vs top-2 with 16 experts in every layer,
# paired over 3 seeds (configs/sweeps/moe_vs_dense.py), then its report
# runs/moe_vs_dense/report.html. Prints the results, the comparison with its 95%
# interval and verdict, the report's path and the elapsed time. Running it again skips finished
# members and resumes interrupted ones.
run: setup
	$(PY) -m experiments.sweep --sweep configs/sweeps/moe_vs_dense.py --workdir runs/moe_vs_dense --report

# One run: the ViT Switch-MoE (about 1.5 minutes on 2 CPU cores).
train: setup
	$(PY) -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch

bench: setup
	$(PY) benchmarks/moe_layer.py

test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal tests

setup: $(STAMP) $(DEBIAN_INSTALLED)

$(STAMP): requirements.txt setup.py
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

$(DEBIAN_INSTALLED) &:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(DEBIAN_PACKAGES)

clean:
	rm -rf $(VENV) .data runs
