# Flywheel — every target creates and uses its own virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
FUNNEL_FILES := $(filter-out funnels/funnel.schema.json,$(wildcard funnels/*.json))

.PHONY: install run test lint check schema bench bench-durability worker clean browser audit

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 or newer is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## make run: install, migrate the embedded SQLite database, load the example funnels, serve.
run: $(STAMP)
	@mkdir -p var
	$(BIN)/flywheel migrate
	$(BIN)/flywheel load-funnels --tenant demo $(FUNNEL_FILES)
	FLYWHEEL_ENV=$${FLYWHEEL_ENV:-development} $(BIN)/uvicorn --factory app.main:create_app --host $(HOST) --port $(PORT)

## make browser: Debian's Chromium for the console's end-to-end test. Installed under CI
## (CI=true, as root); elsewhere a missing browser is reported and that one test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$${CI:-}" = "true" ]; then \
	    echo "installing chromium for the console test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	      || { echo "error: could not install chromium" >&2; exit 1; }; \
	  else \
	    echo "WARNING: chromium is not installed; tests/test_console.py will SKIP (apt-get install chromium)" >&2; \
	  fi; }

## make audit: pip-audit over the installed dependencies; fails on a known vulnerability
## (and says how many packages PyPI could answer for). CI runs it after the tests.
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

## make test: install and run the whole suite (SQLite and, when reachable, PostgreSQL).
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make bench: webhooks, group-buy joins and solitaire appends on SQLite and PostgreSQL next
## to a bare FastAPI baseline, and the funnel report over 1M members, in one run; writes
## bench/results.md and bench/results.json.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## make bench-durability: kill -9 the server mid-run; every acknowledged event must be stored.
bench-durability: $(STAMP)
	$(BIN)/python -m bench.run --durability --targets sqlite,postgres

## make worker: timers, deliveries and pruning in their own process (serve with FLYWHEEL_WORKERS=off).
worker: $(STAMP)
	$(BIN)/flywheel worker

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## make schema: regenerate funnels/funnel.schema.json from the definition models.
schema: $(STAMP)
	$(BIN)/flywheel schema > funnels/funnel.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
