# Two entry points: `make demo` (set up + CPU end-to-end demo) and `make test` (set up + tests).
# `make lint` (ruff, import contracts) runs before `make test` in CI; `make format` rewrites in place.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test test-slow bench lint format
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,parity,serve]"
	touch $@

demo: setup
	$(PY) -m polaris_jax.main --config=configs/grpo_tiny.py --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest tests --timeout=900 --durations=10

test-slow: setup  # the tests marked slow (GRPO learning, the multi-host Polaris recipe); CI runs them too
	$(PY) -m pytest tests --timeout=900 --durations=10 -m slow

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b; done
