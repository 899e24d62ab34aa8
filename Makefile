# The two commands of the README: `make dev` runs the product, `make test` runs the whole suite.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: dev test lint bench-tools bench clean

dev: $(VENV)/.installed
	$(BIN)/vault-edge dev

# The whole suite runs in two pytest processes at once: the end-to-end tests (tests/e2e and
# tests/agents_js: real processes, mostly waiting on them, and every apt-get or npm install) beside
# the rest, each in its own temp dir; the first one's report is printed after the second's. With
# PYTEST_ARGS (a path, -k ...) one process runs what they name.
test: lint
ifeq ($(strip $(PYTEST_ARGS)),)
	@tmp=$$(mktemp -d /tmp/ve-test.XXXXXX); \
	$(BIN)/pytest -p no:cacheprovider --basetemp=$$tmp/e2e tests/e2e tests/agents_js >$$tmp/e2e.log 2>&1 & e2e=$$!; \
	$(BIN)/pytest --basetemp=$$tmp/rest --ignore=tests/e2e --ignore=tests/agents_js; rest=$$?; \
	wait $$e2e; e2e=$$?; \
	echo "== tests/e2e tests/agents_js (run beside the above) =="; cat $$tmp/e2e.log; \
	rm -rf $$tmp; \
	echo "== exit: $$rest (the rest), $$e2e (end to end) =="; \
	test $$rest = 0 && test $$e2e = 0
else
	$(BIN)/pytest $(PYTEST_ARGS)
endif

# ruff (lint and format), mypy --strict on the packages pyproject lists, the import-linter contracts.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check vault_edge tests bench
	$(BIN)/ruff format --check vault_edge tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[postgres]'  # the README's PostgreSQL line works after make dev
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# Benchmarks (figures in the README): see bench/README.md. `make bench-tools` builds the load
# generator and the C ceiling from bench/tools/ with the system cc; `make bench` is a short
# socket-read run (BENCH_ARGS=--runs 3 --duration 5 for the README's settings).
BENCH_BUILD  := bench/tools/build
BENCH_TOOLS  := $(BENCH_BUILD)/udsbench $(BENCH_BUILD)/udsceiling
BENCH_CFLAGS ?= -O2 -Wall -Wextra -pthread
BENCH_ARGS   ?= --runs 1 --duration 3 --warmup 1

bench-tools: $(BENCH_TOOLS)

$(BENCH_BUILD)/%: bench/tools/%.c
	@mkdir -p $(@D)
	$(CC) $(BENCH_CFLAGS) -o $@ $<

bench: bench-tools $(VENV)/.installed
	$(BIN)/python bench/socket_read.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(BENCH_BUILD)
