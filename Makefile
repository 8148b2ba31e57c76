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

.PHONY: setup repro test lint bench clean docker-engine images images-training push

$(STAMP): pyproject.toml images/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --constraint images/constraints.txt -e ".[dev,production,spark]"
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

# images/: the pipeline (CPU) and serving images, tagged from params.yaml, from a Debian base built here
# (BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:... where a registry is reachable); the CUDA training
# image is opt-in (several GB)
docker-engine:
	images/docker_engine.sh

images: $(STAMP)
	$(BIN)/python images/build.py pipeline serving

images-training: $(STAMP)
	$(BIN)/python images/build.py training

# `make images push REGISTRY=host[:port][/path]`: the built images into that registry, their digests into
# images/pushed.json (git-ignored), which `python -m pipelines compile --images images/pushed.json` pins;
# PUSH_IMAGES="pipeline serving training" after `make images-training`
REGISTRY    ?=
PUSH_IMAGES ?= pipeline serving
IMAGES_LOCK ?= images/pushed.json
ifneq ($(filter push,$(MAKECMDGOALS)),)
ifeq ($(strip $(REGISTRY)),)
$(error make push: set REGISTRY=host[:port][/path], e.g. make images push REGISTRY=registry.example.com/ml)
endif
endif

push: images
	$(BIN)/python images/build.py push --registry "$(REGISTRY)" --lock "$(IMAGES_LOCK)" $(PUSH_IMAGES)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest_features

clean:
	rm -rf data artifacts metrics reports plots feature_repo/data
