# The two front-door commands: `make up` (set up, run the whole loop) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup up test lint docs clean

$(BIN)/binloop: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/binloop

up: setup
	$(BIN)/binloop up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/binloop export-schemas --check

test: lint
	tools/install_prometheus.sh
	PYTHON=$(PYTHON) tools/install_label_studio.sh
	$(BIN)/pytest

docs: setup
	$(BIN)/binloop export-schemas
	$(BIN)/binloop export-asyncapi --out docs/asyncapi

clean:
	rm -rf .binloop .pytest_cache .mypy_cache .ruff_cache
