# `make demo` and `make test` work on a fresh machine: they create .venv, install the project and run.
# The test install includes the `dask` extra: tests/pipeline/test_dask.py runs the dataset jobs on a
# real dask.distributed cluster, in CI too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist). Most tests keep one core busy (tracing, Beam's DirectRunner), so
# two processes on CI's 2 cores take 14 min where one takes 22; each file stays in one process so
# its module fixtures are built once. `make test TEST_WORKERS=8` on a bigger machine.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.py
	$(BIN)/pip install --quiet -e ".[test,dask]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bmvae demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
