# `make run` and `make test` set everything up themselves on a fresh machine (as root):
# Debian's Fashion-MNIST package, a virtualenv in .venv with the pinned requirements, moe_jax
# installed editable. The venv is rebuilt only when requirements.txt or setup.py change.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test bench sweep setup clean

# The main job: train the default ViT MoE (Switch, 8 experts) on fashion_mnist, a few minutes on
# 2 CPU cores. Running it again resumes from, or reports, the finished run in runs/vit_switch.
run: setup
	$(PY) -m experiments.train --config configs/vit_switch.py --workdir runs/vit_switch

bench: setup
	$(PY) benchmarks/moe_layer.py

test: setup
	$(PY) -m pytest -q -n 2 tests

# Every router at equal active FLOPs, 2 seeds (about 15 minutes); prints the results table.
sweep: setup
	$(PY) -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers

setup: $(STAMP) $(FASHION_MNIST)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(FASHION_MNIST):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) .data runs
