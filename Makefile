# Contributor commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := -e libs/common[sentry] -e services/records -e services/collab -e services/bots

.PHONY: install run test test-fast bench lint clean node doctor

install: $(BIN)/.installed node

$(BIN)/.installed: requirements-dev.txt libs/common/pyproject.toml services/*/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt $(PACKAGES)
	touch $@

node: tests/node/node_modules/.installed bench/node_modules/.installed playground/dist/.built

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# make bench's reference servers and load generators (its own npm package).
bench/node_modules/.installed: bench/package.json bench/package-lock.json
	cd bench && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The development playground page (served by records at / in development):
# its npm libraries bundled by esbuild into playground/dist, plus the
# playwright-core driver of its browser test (uses Debian's chromium).
playground/dist/.built: playground/package.json playground/package-lock.json playground/build.mjs playground/index.html playground/src/*
	cd playground && npm ci --no-audit --no-fund --loglevel=error && node build.mjs
	touch $@

run: install
	$(BIN)/python scripts/run.py

# channels-doctor against `make run`'s services, with the defaults scripts/run.py
# gives them (set REDIS_URL, PRIVATE_APP_URL, PUBLIC_APP_URL to check others).
doctor: install
	REDIS_URL="$${REDIS_URL:-redis://127.0.0.1:$${DEV_REDIS_PORT:-6380}/0}" \
	PRIVATE_APP_URL="$${PRIVATE_APP_URL:-http://127.0.0.1:$${DEV_RAILS_PORT:-3030}}" \
	PUBLIC_APP_URL="$${PUBLIC_APP_URL:-http://localhost:5000}" \
	$(BIN)/channels-doctor $(DOCTOR_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check libs services tests scripts

clean:
	rm -rf $(VENV) tests/node/node_modules bench/node_modules .pytest_cache
