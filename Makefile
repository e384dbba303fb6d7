# Contributor commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := -e libs/common[sentry] -e services/records -e services/collab -e services/bots
# Development-only tools (channels-dev-rails, a private Redis): .venv only,
# never the images. Installed after PACKAGES: channels-dev-rails once came
# with channels-common, whose upgrade in an older .venv would delete it.
DEV_PACKAGES := -e libs/dev
# Hashed, pinned locks (locks/*.txt, refreshed by `make lock`): dev.txt is
# what .venv holds, <service>.txt what that service's image holds. They
# resolve from uv's default index for Python 3.11 and 3.12 (--universal), and omit our own
# packages, which are installed after them with --no-deps.
OURS := channels-common channels-dev channels-records channels-collab channels-bots
UV_COMPILE = uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" \
	$(addprefix --no-emit-package ,$(OURS))

.PHONY: install run test test-fast fuzz soak bench lint lock clean node doctor images

install: $(BIN)/.installed node

$(BIN)/.installed: locks/dev.txt libs/*/pyproject.toml services/*/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r locks/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation $(PACKAGES)
	$(BIN)/pip install -q --no-deps --no-build-isolation $(DEV_PACKAGES)
	$(BIN)/pip check
	touch $@

# Re-resolve the locks after a change to requirements-dev.txt or a
# pyproject.toml, keeping every pin that still fits. Upgrades are explicit:
# `make lock UV_ARGS=--upgrade` (everything), `UV_ARGS=--upgrade-package=redis`.
# Then `make install` and `make test` (tests/test_dependency_contracts.py).
lock: $(BIN)/uv
	for name in dev records collab bots; do \
	  $(BIN)/$(UV_COMPILE) $(UV_ARGS) locks/$$name.in -o locks/$$name.txt || exit 1; \
	done

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

# uv is in locks/dev.txt; this only bootstraps a venv that has no lock yet.
$(BIN)/uv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv

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

# Everything but the tests marked slow (those that start services as
# processes, real browsers, installs, the tiny bench): under a minute.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The property tests (test_properties*.py) with random seeds and many more
# examples, for FUZZ_SECONDS; `make test` runs them derandomized, with few.
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python scripts/fuzz.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# The three images, one after another: docker where an engine answers,
# buildah otherwise, on a bookworm base made here when the Dockerfiles'
# default cannot be pulled (deploy/images/build.py; docs/deploy.md).
# IMAGES_ARGS: --tag TAG, --base auto|default|bookworm, service names.
images:
	$(PYTHON) deploy/images/build.py $(IMAGES_ARGS)

# The chaos soak (tests/soak): every service as processes behind proxies, real
# clients, a real Synapse, seeded faults and hostile traffic; the invariants
# printed as figures. SOAK_BOTS_INSTANCES (default 2) sets the bots instances.
# `make test` runs a 45 s version (tests/soak/test_soak.py).
SOAK_SECONDS ?= 600
SOAK_SEED ?= 7
SOAK_BOTS_INSTANCES ?= 2
soak: install
	$(BIN)/python -m tests.soak.run --seconds $(SOAK_SECONDS) --seed $(SOAK_SEED) --bots $(SOAK_BOTS_INSTANCES)

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check libs services tests scripts

clean:
	rm -rf $(VENV) tests/node/node_modules bench/node_modules .pytest_cache
