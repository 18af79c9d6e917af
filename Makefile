# Two commands on a fresh machine:
#   make demo        set up (venv, packages, offline data) and run the main job on the embedded default
#   make test        set up, start the services the tests need, lint, type-check and run the whole suite
# and the fast lane while working: make test-fast (no services, no end-to-end training; about a minute)
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup data demo study study-k study-16ep study-16ep-5seeds study-k-16ep test test-fast lint typecheck pytest services bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.stamp-* && touch $@

setup: $(STAMP) data

data:
	@bash scripts/fetch_data.sh data

demo: setup
	$(BIN)/orchestrator demo

# The paper-core study at CPU scale (about 75 minutes on 2 cores; rerun to resume): results/paper_core_tiny/
study: setup
	@test -d data/composites-study/pretrain || $(BIN)/python -m evaluator.composites study --out data/composites-study
	$(BIN)/orchestrator study paper_core_tiny

# The k ablation at the same scale (68 min on 2 cores, 2 h 10 min on a slower host; rerun to resume): results/paper_k_tiny/
study-k: setup
	@test -d data/composites-study/pretrain || $(BIN)/python -m evaluator.composites study --out data/composites-study
	$(BIN)/orchestrator study paper_k_tiny

# The core study at 16 epochs instead of 4 (about 1 h 50 min on 2 cores; rerun to resume): results/paper_core_tiny_16ep/
study-16ep: setup
	@test -d data/composites-study/pretrain || $(BIN)/python -m evaluator.composites study --out data/composites-study
	$(BIN)/orchestrator study paper_core_tiny_16ep

# The 16-epoch core study at 5 seeds: seeds 0-2 (study-16ep), then seeds 3-4 (about 70 minutes more), then one
# analysis of all five seed pairs: results/paper_core_tiny_16ep_5seeds/
study-16ep-5seeds: study-16ep
	$(BIN)/orchestrator study paper_core_tiny_16ep_seeds34
	$(BIN)/orchestrator study-pool results/paper_core_tiny_16ep results/paper_core_tiny_16ep_seeds34 \
		--out results/paper_core_tiny_16ep_5seeds --name paper-core-tiny-16ep-5seeds

# The k ablation at 16 epochs: three seeds as three sweeps (64-100 min each on 2 cores; rerun to resume),
# then one analysis of all of them: results/paper_k_tiny_16ep/
study-k-16ep: setup
	@test -d data/composites-study/pretrain || $(BIN)/python -m evaluator.composites study --out data/composites-study
	$(BIN)/orchestrator study paper_k_tiny_16ep_seed0
	$(BIN)/orchestrator study paper_k_tiny_16ep_seed1
	$(BIN)/orchestrator study paper_k_tiny_16ep_seed2
	$(BIN)/orchestrator study-pool results/paper_k_tiny_16ep_seed0 results/paper_k_tiny_16ep_seed1 \
		results/paper_k_tiny_16ep_seed2 --out results/paper_k_tiny_16ep --name paper-k-tiny-16ep

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

services:
	@bash scripts/services.sh start

pytest: setup services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: setup lint typecheck pytest

test-fast: setup lint
	$(BIN)/python -m pytest -m "not services and not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf outputs mlruns .pytest_cache .mypy_cache .ruff_cache
