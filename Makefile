# Two commands matter: `make train` (set up and run the main job) and `make test` (set up and run all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make train` data (lyapunov_callbacks/make_train.py chooses, and says which in the run's first and last lines):
# DATA=auto (default): CIFAR-10 when $(DATA_DIR)/cifar-10-batches-py is complete or can be downloaded, otherwise
# the offline stand-in; DATA=cifar: CIFAR-10 only (one short message naming the offline commands if it is
# neither on disk nor downloadable); DATA=synthetic: the deterministic CIFAR-shaped stand-in (no network, no
# files); DATA=digits: scikit-learn's real 8x8 digits, upsampled to 3x32x32 (the run file's class selection
# carries over, e.g. cat/dog [3, 5] becomes digits 3 and 5). Logs go to logs/<run>/<data>/version_N.
DATA ?= auto
DATA_DIR ?= data
CONFIG ?= configs/quasi_newton/mlp_ce.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast bench figures clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

train: install
	@$(BIN)/python -m lyapunov_callbacks.make_train --data $(DATA) --data-dir $(DATA_DIR) --config $(CONFIG) -- $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The paper's figures 1-10, the AdamW figure, the analysis figures and the summary every quoted number comes from,
# retrained from scratch: figures/make_figures.py runs the plan of figures/figures.yaml. DATA=synthetic (offline
# CIFAR-shaped stand-in), DATA=digits (scikit-learn's real 8x8 digits), DATA=cifar ($(DATA_DIR)/cifar-10-batches-py;
# also what the default DATA=auto means here).
# Full scale (default): writes docs/figures/$(DATA)/, docs/results/summary_$(DATA).{md,json,csv} and regenerates
# docs/results.md. QUICK=1: every run of the plan and every figure, one seed and a few dozen steps each; still
# every run (55 for DATA=synthetic), so it costs minutes, not seconds: it writes under figures/quick/ (not
# committed). Both print the number of runs and the predicted time before they start (FIGURES_ARGS=--plan: per
# run). Runs train JOBS at a time (default: one single-threaded process per core).
# FIGURES_ARGS e.g. --only fig2, --list, --plan (predicted time from figures/rates.json), --plot-only, --page-only
# (rewrite docs/results.md from the committed summaries after a change to its text).
QUICK ?=
JOBS ?=
FIGURES_ARGS ?=
figures: install
	$(BIN)/python figures/make_figures.py --data $(if $(filter auto,$(DATA)),cifar,$(DATA)) --data-dir $(DATA_DIR) $(if $(QUICK),--quick,) \
		$(if $(JOBS),--jobs $(JOBS),) $(FIGURES_ARGS)

# The competitors of the benchmarks (PyHessian, Prodigy, D-Adaptation, schedule-free) are the `bench` extra.
bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache lightning_logs
