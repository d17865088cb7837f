# The two set-up commands of the README: `make demo` and `make test` (lint, type check, every
# test). Both build .venv from pyproject.toml on first use (torch + torchvision from the package registry: ~2 min, ~5 GB).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint unit integration bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/adqueue demo

test: lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests/unit

integration: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests/integration

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) adqueue-data .pytest_cache
