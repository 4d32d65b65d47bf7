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
	$(BIN)/pip install -q -e '.[dev,embedded,compiled]'
	@touch $(STAMP)

# The hot modules compiled (HOT: nudgeflow/compiled.py's MODULES), again whenever one of them changes. Without a
# C compiler this says so and everything runs from source: same results, ~10% more CPU per event.
HOT := engine/core.py engine/core.pxd engine/state.py engine/predicates.py engine/templates.py engine/graph.py \
	agents/batch.py agents/store.py agents/timers.py agents/keys.py agents/occupancy.py streams/events.py streams/wire.py
COMPILED := $(VENV)/.compiled
$(COMPILED): $(STAMP) $(HOT)
	@$(BIN)/nudgeflow compile >/dev/null && echo "compiled modules built" \
	  || echo "compiled modules NOT built (no C compiler?): running from source"
	@touch $(COMPILED)

demo: $(COMPILED)
	$(BIN)/nudgeflow demo

test: lint $(COMPILED)
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

unit: $(COMPILED)
	$(BIN)/pytest -q tests/unit

integration: $(COMPILED)
	$(BIN)/pytest -q tests/integration

clean:
	rm -rf $(VENV) engine/*.so agents/*.so streams/*.so nudgeflow-data .pytest_cache .mypy_cache .ruff_cache
