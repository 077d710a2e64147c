# digit-recognition: `make pipeline` runs everything on the defaults, `make test` runs every test.
# Both need nothing but Python 3: `setup` creates .venv and installs the package with its dev extra.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Optional: a PyTorch wheel index (e.g. https://download.pytorch.org/whl/cpu for small CPU-only wheels).
TORCH_INDEX ?=

.PHONY: help setup data pipeline test test-notebooks test-pytest lab export readme
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: $(BIN)/.installed  ## create .venv and install the package (editable) with the dev extra
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

data: setup  ## get, verify, clean, split and version MNIST into dataset_cleaned/
	$(BIN)/digit-data

pipeline: setup data  ## the whole pipeline on the defaults

test: setup data test-notebooks test-pytest  ## every test: the notebooks (nbdev-test), then pytest

test-notebooks: setup
	$(BIN)/nbdev-test --n-workers 2

test-pytest: setup
	$(BIN)/pytest

lab: setup  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab nbs

export: setup readme  ## notebooks -> digit_recognition/ and README.md, and clean notebook metadata
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

readme: setup  ## README.md from nbs/index.ipynb (nbdev-readme where Quarto is installed, else nbconvert)
	if command -v quarto >/dev/null; then $(BIN)/nbdev-readme; \
	else $(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN; fi
