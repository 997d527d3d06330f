# Two entry points: `make demo` (set up + CPU end-to-end demo) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,parity]"
	touch $@

demo: setup
	$(PY) -m polaris_jax.main --config=configs/grpo_tiny.py --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest tests --timeout=900 --durations=10

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b; done
