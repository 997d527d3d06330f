# Two entry points: `make demo` (set up + CPU end-to-end demo) and `make test` (set up + tests).
# `make lint` (ruff, import contracts) runs before `make test` in CI; `make format` rewrites in place.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test test-slow test-cuda-lowering bench lint format
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,parity,serve,cookbook]"
	$(PY) -m pip install -q --no-deps "tinker-cookbook==0.6.1"  # see the cookbook extra in pyproject.toml
	touch $@

demo: setup
	$(PY) -m polaris_jax.main --config=configs/grpo_tiny.py --workdir=$(WORKDIR)

# Two workers, one test file each at a time (module fixtures such as a started server stay in one worker).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests --timeout=900 --durations=10 -n $(TEST_WORKERS) --dist loadfile

test-slow: setup  # the tests marked slow (GRPO learning, the multi-host Polaris recipe); CI runs them too
	$(PY) -m pytest tests --timeout=900 --durations=10 -m slow

# cuDNN attention lowered for cuda on this CPU-only host: jax traces it only with the CUDA plugin and cuDNN
# present (no GPU needed), so both wheels (~0.5 GB) go to a side folder, never into the venv.
CUDA_LOWERING ?= .cuda-lowering
test-cuda-lowering: setup
	$(PY) -m pip install -q --no-deps --target $(CUDA_LOWERING) \
		"jax-cuda13-plugin==$$($(PY) -c 'import jax; print(jax.__version__)')" nvidia-cudnn-cu13
	JAX_PLATFORMS=cpu PYTHONPATH=$(CUDA_LOWERING):. $(PY) -m pytest tests/test_lowering.py \
		tests/models/test_attention_kernels.py -k "cuda or cudnn" -rs

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	for b in benchmarks/*.py; do case $$b in */__init__.py|*/cases.py|*/device_suite.py) ;; *) $(PY) $$b;; esac; done
