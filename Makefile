# The two commands: `make run` serves the embedded default model on localhost:8000,
# `make test` runs the test suite. Both create ./.venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup gpu-test clean

$(BIN)/rose: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so no dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/rose

setup: $(BIN)/rose
	$(BIN)/rose setup

run: setup
	$(BIN)/rose run

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

gpu-test: setup
	$(BIN)/python -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .rose
