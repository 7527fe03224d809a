# All set-up happens here: targets create .venv and install tagml into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tagml-installed

.PHONY: install demo test lint ui mlflow-ui bench clean

export OMP_WAIT_POLICY ?= PASSIVE
# no telemetry from any target (tagml.core.runtime.configure_process sets the same for every entry point)
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
export DAGSTER_DISABLE_TELEMETRY ?= 1

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	# bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every process would
	# otherwise compile dagster, mlflow and scipy again (measured: importing the stack 40 s -> 12 s at load 7);
	# a few packages ship files that do not compile, which is not an install failure
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tagml demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff lint and format (configured in pyproject.toml); CI runs this before the tests
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: $(STAMP)
	$(BIN)/tagml ui

mlflow-ui: $(STAMP)
	$(BIN)/tagml mlflow-ui

bench: $(STAMP)
	$(BIN)/python bench/bench_features.py

clean:
	rm -rf .tagml
