# Both entry points bootstrap their own virtualenv, so a fresh clone needs only Python >= 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conveyor demo

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The peers are installed for the side-by-side runs only: procrastinate and
# pgqueuer from PyPI; pg-boss and graphile-worker from npm when node and npm
# are present (otherwise the harness leaves them out and says so).
$(VENV)/.peers: $(STAMP) benchmarks/peers/node/package-lock.json
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	if command -v npm >/dev/null; then cd benchmarks/peers/node && npm ci --no-audit --no-fund --silent; fi
	touch $(VENV)/.peers

bench: $(VENV)/.peers
	$(BIN)/python -m benchmarks.run --out benchmarks/results
