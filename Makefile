# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   create .venv, install edgeopt, run the demo on the bundled model
#   make test   create .venv, install edgeopt with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_CORE := $(VENV)/.installed-core
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test test-all tflm-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_CORE)

demo: $(STAMP_CORE)
	$(BIN)/edgeopt demo -o demo-out

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q

test-all: $(STAMP_TEST)
	$(BIN)/python -m pytest -q -m ''

# TensorFlow + TFLite Micro for benchmarks/mcu_vs_tflm.py, kept out of the main venv.
tflm-venv:
	$(PYTHON) -m venv .venv-tflm
	.venv-tflm/bin/python -m pip install --quiet -e '.[tflm]'

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
