# digit-recognition: `make pipeline` runs everything on the defaults, `make test` runs every test.
# Both need nothing but Python 3: `setup` creates .venv and installs the package with its dev extra.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Optional: a PyTorch wheel index (e.g. https://download.pytorch.org/whl/cpu for small CPU-only wheels).
TORCH_INDEX ?=
# Extra pytest arguments, e.g. PYTEST_ARGS="-x -k client".
PYTEST_ARGS ?=
# pytest on three workers where pytest-xdist is installed (MLflow-server tests: a worker per server, tests/conftest.py).
XDIST = $(shell $(BIN)/python -c 'import xdist' 2>/dev/null && echo '-n 3')
# The notebooks' tests, two at a time; mlruns/ folders (MLflow artifacts, which hold copies of notebooks) are not sources.
NBDEV_TEST := $(BIN)/nbdev-test --n-workers 2 --skip-folder-re '^([_.]|mlruns$$)'

.PHONY: help setup lock data train evaluate sweep tune pipeline predict client serve lab ui bench bench-client bench-serve
.PHONY: export readme
.PHONY: docs-outputs
.PHONY: bytecode test test-fast test-notebooks test-pytest test-notebooks-fast test-pytest-fast
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

# The stamp is named by the content of pyproject.toml and constraints.txt, not their dates: nbdev-export rewrites
# pyproject.toml unchanged, and that alone must not reinstall everything before the next test run.
INSTALLED := $(BIN)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
setup: $(INSTALLED)  ## create .venv and install the package (editable) with the dev extra
$(INSTALLED):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	for c in export clean test readme; do ln -sf nbdev-$$c $(BIN)/nbdev_$$c; done  # nbdev 2 names, still in guides and hooks
	rm -f $(BIN)/.installed*; touch $@

lock: setup  ## upgrade every dependency within pyproject.toml's ranges and rewrite constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade -e '.[lab]'   # every extra: the lock pins JupyterLab's too
	{ head -1 constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^digit-recognition'; } > constraints.new
	mv constraints.new constraints.txt

data: setup  ## get, verify, clean, split and version MNIST into dataset_cleaned/
	$(BIN)/digit-data

train: setup  ## train the default recipe (digit-train), tracked in MLflow
	$(BIN)/digit-train

sweep: setup  ## an example sweep: two learning rates x two models
	$(BIN)/digit-sweep --grid lr=0.003,0.01 --grid model=mlp,cnn --epochs 3

tune: setup  ## an example study: 10 trials over [tune] space, 3 epochs each, pruned (digit-tune; ARGS= for more flags)
	$(BIN)/digit-tune --trials 10 --epochs 3 $(ARGS)

evaluate: setup  ## evaluate the latest training run, apply the gate, register it (digit-evaluate)
	$(BIN)/digit-evaluate

pipeline: setup  ## the whole pipeline on the defaults: data -> train -> evaluate -> register (digit-pipeline)
	$(BIN)/digit-pipeline

predict: setup  ## read digits from image files with the champion: make predict IMAGES='photos/*.jpg'
	$(BIN)/digit-predict $(IMAGES)

client: setup  ## the drawing pad (needs a display)
	$(BIN)/digit-client

serve: setup  ## the champion over HTTP (digit-serve): API and drawing pad on :8000; make serve ARGS='--port 9000'
	$(BIN)/digit-serve $(ARGS)

# `test` and `test-fast` run the notebooks beside pytest (-j2): most of a test's time is one process importing
# libraries, so the two share the cores; -Oline keeps each output line whole.
# Parallelism comes from the processes (pytest's workers, two notebooks): each PyTorch process on one thread, not
# five processes each spinning two OpenMP threads on two cores; a process that asks for more threads (the tests'
# shared checkpoint) gets them without spinning (OMP_WAIT_POLICY).
TEST_TARGETS = test test-fast test-notebooks test-notebooks-fast test-pytest test-pytest-fast
$(TEST_TARGETS): export OMP_NUM_THREADS ?= 1
$(TEST_TARGETS): export OMP_WAIT_POLICY ?= PASSIVE

test: setup data bytecode  ## every test, what CI runs: all notebook cells, all of pytest (the 15 slowest listed)
	$(MAKE) --no-print-directory -j2 -Oline test-notebooks test-pytest

test-fast: setup data bytecode  ## while working (minutes): notebook cells not flagged `#| slow`, pytest -m "not slow"
	$(MAKE) --no-print-directory -j2 -Oline test-notebooks-fast test-pytest-fast

# The package's bytecode, written once before the tests' few hundred processes import it: where
# PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) Python would otherwise compile every module it
# imports again in each process (pip compiles the installed packages, not an editable checkout).
bytecode: setup
	$(BIN)/python -m compileall -q digit_recognition

test-notebooks-fast: setup
	$(NBDEV_TEST)

test-pytest-fast: setup
	$(BIN)/pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

test-notebooks: setup  ## every notebook cell, `#| slow` ones included (nbdev-test --flags slow)
	$(NBDEV_TEST) --flags slow

test-pytest: setup  ## every pytest test, slow ones included; lists the 15 slowest
	$(BIN)/pytest $(XDIST) --durations=15 $(PYTEST_ARGS)

lab: setup  ## JupyterLab on the notebooks (installs the lab extra the first time)
	$(BIN)/python -c 'import jupyterlab' 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[lab]'
	$(BIN)/jupyter lab nbs

ui: setup  ## the MLflow UI on the local store (mlflow.db)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

bench: setup data  ## training speed: our recipes against the PyTorch MNIST example (about 10 minutes)
	$(BIN)/python bench/train_speed.py

bench-client: setup  ## the client: photo accuracy, one-image latency, digit-predict over 1,000 files (needs a champion)
	$(BIN)/python bench/client_speed.py

bench-serve: setup  ## the server under load: digit-serve vs mlflow models serve, requests/s, latency (needs a champion)
	$(BIN)/python bench/serve_load.py

export: setup readme  ## notebooks -> digit_recognition/ (code and the papermill notebooks) and README.md; clean metadata
	$(BIN)/nbdev-export
	$(BIN)/python -c "from digit_recognition.tracking import ship_notebooks; ship_notebooks()"
	$(BIN)/nbdev-clean

readme: setup  ## README.md from nbs/index.ipynb (nbdev-readme where Quarto is installed, else nbconvert)
	if command -v quarto >/dev/null; then $(BIN)/nbdev-readme; \
	else $(BIN)/jupyter nbconvert $(README_ARGS) --output-dir . --output README; fi
README_ARGS = --to markdown nbs/index.ipynb --TagRemovePreprocessor.remove_input_tags remove_input --log-level WARN

docs-outputs: setup data  ## run every notebook (slow cells too) and keep its outputs, figures included, for the docs
	$(NBDEV_TEST) --flags slow --save
	$(BIN)/nbdev-clean
