# fastcert: `make help` lists the targets. Every target creates .venv on first use.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=
# pytest workers: the suite is CPU-bound; each worker uses one torch thread
JOBS ?= 2

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps auto_LiRPA==0.3
	$(PIP) uninstall -q -y hydra-optuna-sweeper  # replaced by fastcert's sweeper (pins optuna < 3)
	$(PIP) install -q -e '.[dev,sweeps,docs]'
	@touch $@

# certify's complete stage (complete.engine=neuralsat): NeuralSAT in its own environment, since it
# installs a top-level package `src` and its own auto_LiRPA
NEURALSAT_VENV ?= .venv-neuralsat

$(NEURALSAT_VENV)/.installed:
	@test -x $(NEURALSAT_VENV)/bin/python || $(PYTHON) -m venv $(NEURALSAT_VENV)
	$(NEURALSAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEURALSAT_VENV)/bin/python -m pip install -q neuralsat==0.2.17
	@touch $@

.PHONY: help install lint format docs bytecode test test-all test-neuralsat neuralsat run bench gpu-check clean
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv and install torch, auto_LiRPA 0.3 and fastcert[dev,sweeps,docs]

lint: $(VENV)/.installed ## ruff (pyproject.toml [tool.ruff]) and the 80-line cap on functions (tests/test_lint.py)
	$(PY) -m ruff check fastcert experiments tests docs hydra_plugins
	$(PY) -m pytest -q -n 0 -p no:cacheprovider tests/test_lint.py

format: $(VENV)/.installed ## what ruff can fix by itself (import order, pyupgrade); not `ruff format`
	$(PY) -m ruff check --fix fastcert experiments tests docs hydra_plugins

docs: $(VENV)/.installed ## build the docs site into docs/_build/html; any warning (broken link or reference) fails
	$(PY) -m sphinx -b html -W --keep-going -n -q docs docs/_build/html

# The suite starts a few hundred Python processes (CLI runs, certify, ranks). Where the environment
# sets PYTHONDONTWRITEBYTECODE (as this project's development machines do), none caches its bytecode,
# so each compiled fastcert's modules again: compile them once, first (measured: 7 % of the time of
# tests/test_run.py on a fresh clone).
bytecode: $(VENV)/.installed
	$(PY) -m compileall -q fastcert experiments hydra_plugins

test: bytecode ## fast test suite (excludes @pytest.mark.slow), what CI runs
	$(PY) -m pytest -q -m "not slow" -n $(JOBS) $(PYTEST_ARGS)

test-all: bytecode ## every test, the slow ones included
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)

neuralsat: $(NEURALSAT_VENV)/.installed ## NeuralSAT 0.2.17 for certify's complete stage, in .venv-neuralsat (NEURALSAT_VENV=...)

test-neuralsat: $(VENV)/.installed $(NEURALSAT_VENV)/.installed ## the tests marked neuralsat (they skip without its environment)
	FASTCERT_NEURALSAT_VENV=$(abspath $(NEURALSAT_VENV)) $(PY) -m pytest -q -n 0 -m neuralsat $(PYTEST_ARGS)

run: $(VENV)/.installed ## train + certify: make run ARGS="model=cnn7 data=cifar10"
	$(PY) -m fastcert.run $(ARGS)

bench: $(VENV)/.installed ## time one training step per method (CNN-7, CIFAR shapes); peak memory per evaluation phase
	$(PY) -m experiments.bench $(ARGS)
	$(PY) -m experiments.memory_bench

gpu-check: $(VENV)/.installed ## every GPU figure in one command (< 8 min on one H100): Markdown report + CSV
	$(PY) -m experiments.gpu_check $(ARGS)

clean: ## remove outputs of runs (never the venv or data)
	rm -rf outputs multirun wandb .pytest_cache
