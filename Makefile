# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chaos lint typecheck bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m consumer.demo

test: $(STAMP)
	$(BIN)/ruff check consumer tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

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
