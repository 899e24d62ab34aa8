# The two commands of the README: `make dev` runs the product, `make test` runs the whole suite.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: dev test lint bench-tools bench clean

dev: $(VENV)/.installed
	$(BIN)/vault-edge dev

test: $(VENV)/.installed-test
	$(BIN)/ruff check vault_edge tests bench
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check vault_edge tests bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# Benchmarks (figures in the README): see bench/README.md.
bench-tools:
	rm -rf /tmp/ve-bench && cp -r ../shared/bench /tmp/ve-bench && chmod -R u+w /tmp/ve-bench && make -s -C /tmp/ve-bench tools

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
