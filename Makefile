# Two entry points for a fresh machine:
#   make demo   create the environment if needed, then run the whole pipeline on synthetic data
#   make test   create the environment if needed (and Debian's chromium for the MLflow UI
#               test), then run the test suite: two pytest processes, each test file in one of
#               them (PYTEST_ARGS= runs it in one process)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 --dist loadfile

export PREFECT_HOME ?= $(CURDIR)/.prefect
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -U pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,ops]"
	touch $(STAMP)

demo: env
	$(BIN)/fss demo

test: env
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .prefect demo-workspace
