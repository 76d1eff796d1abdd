# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chaos lint typecheck bench clean postgres-server bus-servers promtool

# Every package at the version and hash requirements/lock.txt pins (no resolver at install
# time), then the project itself, editable, without deps (the lock holds them all). The
# daemon runs with -OO (see deploy/systemd): its dependencies' bytecode for that, and the
# package's own (editable here; the unit and the image compile it in their lib), compiled
# once here rather than at every start of every daemon the tests, the demo and the benchmarks
# spawn: compiling ~100 modules costs each start 0.1 s of CPU and ~2 MB of resident memory.
$(STAMP): pyproject.toml requirements/lock.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -OO -m compileall -q -j0 $(VENV)/lib consumer
	touch $(STAMP)

# Regenerate the lock files from pyproject.toml with uv (installed into the venv on demand;
# it is a tool, not a dependency): requirements/lock.txt, everything `make` installs (runtime,
# every extra, test tools), and requirements/image.txt, what the container image installs
# (runtime and every extra), held to the same versions. For CPython 3.11 on Linux x86_64;
# every file of a pinned release is hashed, so other platforms install from them too.
# Kept pins stay unless asked: make lock LOCK_FLAGS=--upgrade (or --upgrade-package NAME).
UV         := uv==0.13.9
LOCK_FLAGS ?=
LOCK       := $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make lock' $(LOCK_FLAGS)

.PHONY: lock
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(UV)'
	$(LOCK) --extra postgres --extra test -o requirements/lock.txt
	$(LOCK) --extra postgres -c requirements/lock.txt -o requirements/image.txt

demo: $(STAMP)
	$(BIN)/python -m consumer.demo

# The suite in TEST_WORKERS processes (pytest-xdist), a test file to a process, in its order:
# most tests wait on daemons, servers and timers rather than use a core (a run of them uses
# two thirds of one), so two run in about half the time of one on two cores.
TEST_WORKERS ?= 2

test: $(STAMP) postgres-server bus-servers promtool
	$(BIN)/ruff check consumer tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# A PostgreSQL server for the PostgreSQL sink's tests (tests/pg.py starts a throwaway one on
# loopback). Installed with apt-get where we are root on Debian (CI); otherwise a note, and
# those tests skip. Silent when the server binaries are already there.
postgres-server:
	@if command -v postgres >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing the PostgreSQL server for the tests (apt-get install postgresql)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
			|| echo "note: installing postgresql failed; the PostgreSQL sink tests will skip"; \
	else \
		echo "note: no PostgreSQL server (apt-get install postgresql); the PostgreSQL sink tests will skip"; \
	fi

# The message buses for the nats and redis sinks' tests (started on loopback by the tests):
# Debian's nats-server and redis-server, installed as the PostgreSQL server is.
bus-servers:
	@missing=""; \
	command -v nats-server >/dev/null 2>&1 || missing="$$missing nats-server"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing the message buses for the tests (apt-get install$$missing)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
			|| echo "note: installing$$missing failed; their sink tests will skip"; \
	else \
		echo "note: no$$missing (apt-get install$$missing); their sink tests will skip"; \
	fi

# promtool, for the alert rules' checks and unit tests (tests/deploy/test_alert_rules.py):
# it comes with Debian's prometheus package, installed as the PostgreSQL server is.
promtool:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing promtool for the tests (apt-get install prometheus)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
			&& { systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; }; } \
			|| echo "note: installing prometheus failed; the alert rule tests will skip"; \
	else \
		echo "note: no promtool (apt-get install prometheus); the alert rule tests will skip"; \
	fi

# The chaos suite at full size (make test runs it reduced).
chaos: $(STAMP)
	CHAOS_EVENTS=100000 CHAOS_KILLS=10 $(BIN)/python -m pytest -q -o timeout=900 tests/chaos

lint: $(STAMP)
	$(BIN)/ruff check consumer tests bench
	$(BIN)/ruff format --check consumer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/catchup.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
