# Every target creates and uses the local virtualenv, so these are all the set-up a machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Bytecode ahead of time: a proxy then starts without compiling (less time and memory),
	# even where PYTHONDONTWRITEBYTECODE is set.
	$(BIN)/python -m compileall -q src/meshling
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meshling demo

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
