# The two commands of README.md: `make demo` and `make test`. Both build .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration bench clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "nudgeflow needs Python 3.11 or 3.12"'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nudgeflow demo

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

clean:
	rm -rf $(VENV) nudgeflow-data .pytest_cache .mypy_cache .ruff_cache
