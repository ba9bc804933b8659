# Every target creates and uses the local virtualenv, so these are all the set-up a machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-cp chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Bytecode ahead of time: a proxy then starts without compiling (less time and memory),
	# even where PYTHONDONTWRITEBYTECODE is set.
	$(BIN)/python -m compileall -q src/meshling
	touch $(STAMP)

install: $(STAMP)

# The demo's store service is a stock nginx: installed with the other peers when missing.
# Options go in DEMO_ARGS, e.g. make demo DEMO_ARGS="--rps 50 --duration 60".
demo: $(STAMP)
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || bash scripts/install-peers
	$(BIN)/meshling demo $(DEMO_ARGS)

test: $(STAMP)
	bash scripts/install-peers
	bash scripts/start-services
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	bash scripts/install-peers
	$(BIN)/python bench/run.py

bench-cp: $(STAMP)
	$(BIN)/python bench/cp.py

# The chaos suite's long form: faults under traffic on network namespaces; needs root.
chaos: $(STAMP)
	bash scripts/install-peers
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
