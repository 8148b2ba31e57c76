# Two entry points for a fresh machine with Python 3.11 (see README Quickstart):
#   make repro   -> creates .venv, installs the project, runs `dvc repro` on the embedded default dataset
#   make test    -> creates .venv, installs the project with dev extras, runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
# dvc stages run `python -m components.<step>`: that must be the venv's python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GX_ANALYTICS_ENABLED := False
export FEAST_USAGE := False

.PHONY: setup repro test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest_features

clean:
	rm -rf data artifacts metrics reports plots feature_repo/data
