# Two commands set up a fresh machine and do everything:
#   make demo   creates .venv, installs astar, runs the DVC pipeline (dvc repro) on the demo
#   make test   creates .venv, installs astar with its test tools, runs lint and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch from the local wheel cache (an unpinned torch pulls a CUDA build of GBs).
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,pipeline]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc metrics show

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check extract store train evaluate pipelines tests benchmarks

# Under CI=true (or 1, as CI services set it) tests/conftest.py also lists the slowest tests.
test: venv lint
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf $(VENV) build *.egg-info
