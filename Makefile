# The two commands of the README, and the lint check CI runs before the tests:
#   make repro   set everything up, then run the pipeline (dvc repro) on params.yaml
#   make test    set everything up, then run the test suite
#   make lint    set everything up, then lint the code (ruff, config in pyproject.toml)
#   make tune    set everything up, then the Ray Tune sweep (tune/dvc.yaml: not part of `make repro`)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin

# The venv's tools first (dvc runs `python stages/...` and torchrun from PATH);
# no telemetry; caches inside the project so CI and tests reuse them.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup repro test lint tune clean-outputs

setup: $(VENV)/.installed

# torch/torchvision first and pinned (constraints.txt): they are served locally and any
# other release would be a multi-GB download. Re-runs when the dependency list changes.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,tune]'
	touch $@

repro: setup
	dvc repro

# In a network namespace that holds only lo (tests/loopback.sh: torchrun's store binds *:port).
test: setup
	bash tests/loopback.sh python -m pytest

tune: setup
	dvc repro tune/dvc.yaml

lint: setup
	ruff check .

# Removes what DVC caches (data, models, embeddings) and the resumable checkpoints; metrics/,
# reports/, plots/ and dvc.lock are tracked by git (`git checkout -- metrics reports plots dvc.lock`).
clean-outputs:
	rm -rf data models embeddings checkpoints
