# The two commands: `make run` (set up, then run the main job) and `make test` (set up, then the tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# '.[dev]' (tests, notebooks, HF conversion, TensorBoard) for the tests; '.' alone for the main job (a quicker
# first `make run`)
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: setup run test test-slow real-smoke lint bench gpu-check clean

setup: $(STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/vtvc run experiments/configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

real-smoke: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_real_user.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/compose.py

gpu-check: $(STAMP)
	PY=$(PY) benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
