# One way in: `make demo` (set up + plan a bundled model), `make test` (set up + the suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint bench-offsets

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the local CPU build: a bare range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/memplan compile zoo:resnet50 --elem-size 1 --target npu --capacity M_H -o resnet50.plan.json
	$(BIN)/memplan check resnet50.plan.json zoo:resnet50

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
