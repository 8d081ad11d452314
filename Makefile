# One entry point for people and CI. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PG15_URL ?= postgresql://root@127.0.0.1:5432/postgres

.PHONY: setup demo test test-pg15 lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install Tasker with its development tools

demo: setup  ## set up, start the embedded PostgreSQL, migrate and run the demo end to end
	$(BIN)/tasker demo

test: setup  ## set up and run the test suite (embedded PostgreSQL 18 unless TEST_DATABASE_URL is set)
	$(BIN)/pytest

test-pg15: setup  ## the test suite against the system PostgreSQL 15 (slow tests: `make test` runs them)
	TEST_DATABASE_URL=$(PG15_URL) $(BIN)/pytest -m "not slow"

lint: setup  ## ruff, mypy (strict on tasker/) and the import contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup  ## the benchmarks against the peers in one run, reported in docs/benchmarks.md (see bench/README.md)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/make_bench.py

clean:
	rm -rf $(VENV) .tasker .mypy_cache .ruff_cache .pytest_cache
