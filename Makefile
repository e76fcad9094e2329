# Two commands for a fresh machine:
#   make run    set up and run the product (SQLite, filesystem broker: no servers needed)
#   make test   set up and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format bench-refresh bench-proxy bench-sweep bench-dpop browser nginx postgres oidc wrk clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(VENV)/.installed $@

# A local .env with generated keys, so the newcomer's secrets survive restarts.
.env:
	@$(BIN)/python -c "import secrets; from cryptography.fernet import Fernet; \
	print('DEBUG=1'); print('SECRET_KEY=' + secrets.token_urlsafe(50)); \
	print('FERNET_KEYS=' + Fernet.generate_key().decode())" > .env
	@echo "wrote .env with a new SECRET_KEY and FERNET_KEYS (keep it; it decrypts your secrets)"

run: $(VENV)/.installed .env
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensure_admin   # ADMIN_EMAIL=you@example.com make run: notices reach you
	@echo "Admin: http://$(HOST):$(PORT)/admin/  (worker + beat log: var/worker.log)"
	@# The worker runs in its own session (setsid) so a closed terminal's SIGHUP, which Celery
	@# takes as "restart", cannot reach it; the traps stop it (warm shutdown) on exit, Ctrl-C,
	@# TERM and hangup.
	@mkdir -p var; setsid $(BIN)/celery -A config worker --beat --loglevel=INFO --concurrency=2 > var/worker.log 2>&1 & \
	  worker=$$!; trap "kill -TERM $$worker 2>/dev/null" EXIT; \
	  trap "kill -TERM $$worker 2>/dev/null; exit 1" HUP INT TERM; \
	  $(BIN)/python manage.py runserver $(HOST):$(PORT)

# Debian's chromium for the one real-browser test (Playwright cannot download its own here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: the browser test will be skipped (apt-get install chromium)"; fi; }

# Debian's nginx for the production-recipe test (tests/test_deploy.py runs deploy/nginx.conf).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
	  else echo "nginx not installed: the production-recipe test will be skipped (apt-get install nginx)"; fi; }

# Debian's PostgreSQL server binaries (initdb, pg_ctl) for the tests that start a server of
# their own to restart and stop under load (tests/pgcluster.py, tests/test_database_outage.py).
# Only the binaries are used: the package's own cluster and service are left as they are.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL server not installed: the database-outage tests will be skipped (apt-get install postgresql)"; fi; }

# wrk (Debian) drives the proxy benchmark; nginx (above) is one of its targets.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  else echo "wrk not installed: apt-get install wrk"; exit 1; fi; }

# panva's oidc-provider (npm) for the tests that need a real OpenID provider (tests/oidcprovider.py):
# pinned by tests/oidc/package-lock.json, reinstalled only when the lock file changes.
OIDC_STAMP := tests/oidc/node_modules/.installed
$(OIDC_STAMP): tests/oidc/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not installed: the oidc-provider tests will be skipped (Node.js 20+)"; exit 0; }; \
	  npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error && touch $@

oidc: $(OIDC_STAMP)

test: $(VENV)/.installed-test browser nginx postgres oidc
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	ENV_FILE=/dev/null SECRET_KEY=lint FERNET_KEYS=lint DATA_DIR=var/lint \
	  $(BIN)/python manage.py makemigrations --check --dry-run

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-refresh: $(VENV)/.installed-test
	$(BIN)/python bench/refresh_sweep.py

bench-proxy: $(VENV)/.installed-test nginx wrk
	$(BIN)/python bench/proxy.py

bench-dpop: $(VENV)/.installed-test
	$(BIN)/python bench/dpop.py

bench-sweep: $(VENV)/.installed-test
	$(BIN)/python bench/sweep_scale.py

clean:
	rm -rf $(VENV) var/test
