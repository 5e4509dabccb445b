# Two commands matter: `make train` (set up and run the main job) and `make test` (set up and run all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DATA=synthetic trains on the deterministic CIFAR-shaped stand-in (no network, no files needed);
# DATA=digits on scikit-learn's real 8x8 digits, upsampled to 3x32x32 (configs/data/digits.yaml; the run
# file's class selection carries over, e.g. cat/dog [3, 5] becomes digits 3 and 5);
# DATA=cifar (default) reads ./data/cifar-10-batches-py, downloading it when the network allows.
DATA ?= cifar
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
	$(BIN)/lyapunov-cli fit --config $(CONFIG) $(if $(filter digits,$(DATA)),--data configs/data/digits.yaml,) \
		--data.init_args.data_dir $(DATA_DIR) \
		$(if $(filter synthetic,$(DATA)),--data.init_args.synthetic true,) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The paper's figures 1-10, the AdamW figure, the analysis figures and the summary every quoted number comes from,
# retrained from scratch: figures/make_figures.py runs the plan of figures/figures.yaml. DATA=synthetic (offline
# CIFAR-shaped stand-in), DATA=digits (scikit-learn's real 8x8 digits), DATA=cifar ($(DATA_DIR)/cifar-10-batches-py).
# Full scale (default): writes docs/figures/$(DATA)/, docs/results/summary_$(DATA).{md,json,csv} and regenerates
# docs/results.md. QUICK=1: the same runs and figures, one seed, a few dozen steps; writes under figures/quick/
# (not committed). Runs train JOBS at a time (default: one single-threaded process per core).
# FIGURES_ARGS e.g. --only fig2, --list, --plan (predicted time from figures/rates.json), --plot-only, --page-only
# (rewrite docs/results.md from the committed summaries after a change to its text).
QUICK ?=
JOBS ?=
FIGURES_ARGS ?=
figures: install
	$(BIN)/python figures/make_figures.py --data $(DATA) --data-dir $(DATA_DIR) $(if $(QUICK),--quick,) \
		$(if $(JOBS),--jobs $(JOBS),) $(FIGURES_ARGS)

# The competitors of the benchmarks (PyHessian, Prodigy, D-Adaptation, schedule-free) are the `bench` extra.
bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache lightning_logs
