# Two commands do everything: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test lint bench index setup system-deps clean

run: setup index
	$(BIN)/spinbot ui --host $(HOST) --port $(PORT)

# One OpenMP thread per embedding call in the tests: the test process, the UI it starts and the Chroma
# server share two cores, and one's spinning OpenMP workers starve the others.
test: export OMP_NUM_THREADS ?= 1
test: setup system-deps index
	$(BIN)/ruff check bot tests
	$(BIN)/mypy bot
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check bot tests
	$(BIN)/mypy bot

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Speed, overlap, prompt size and memory against the targets: writes BENCHMARKS.md. Measured with the
# embedding threads `make run` uses (all cores unless OMP_NUM_THREADS says otherwise).
bench: setup index
	$(BIN)/python -m bot.bench

# Builds the knowledge index only when it is missing or out of date.
index: setup
	$(BIN)/spinbot index

# Browser and CJK fonts for the UI tests (Debian packages; needs root or sudo).
system-deps:
	@bash scripts/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
