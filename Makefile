# Everything a user or CI runs goes through these targets. Dependencies come from
# pyproject.toml alone: the service needs only the base install; tests, linting,
# export and training add the `export` and `dev` extras (torch, a large install).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 0.0.0.0
PORT   ?= 8000
MODELS ?= models

.PHONY: help setup setup-service serve test lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.service: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[export,dev]'
	@touch $@ $(VENV)/.service

setup-service: $(VENV)/.service  ## install the service only (no torch)

setup: $(VENV)/.dev  ## create .venv with the service, export stage and dev tools

serve: $(VENV)/.service  ## serve every model under models/ on port 8000
	$(BIN)/python -m service --models $(MODELS) --host $(HOST) --port $(PORT)

test: $(VENV)/.dev  ## run the test suite
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev  ## ruff and mypy
	$(BIN)/ruff check service export tools tests
	$(BIN)/ruff format --check service export tools tests
	$(BIN)/mypy

bench: $(VENV)/.dev  ## HTTP throughput and latency against the in-process ceiling (BENCH_ARGS=...)
	$(BIN)/python -m tools.bench $(BENCH_ARGS)

clean:  ## remove caches (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
