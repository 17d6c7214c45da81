# PACS Sentinel: `make demo` runs the product on synthetic studies, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; see the README for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test check-config clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/sentinel demo

test: install-test
	$(BIN)/python -m pytest

check-config: install
	$(BIN)/sentinel check-config -c config.toml

clean:
	rm -rf $(VENV) sentinel-demo var .pytest_cache
