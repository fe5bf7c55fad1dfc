# make demo : create .venv, install mkdt, run the whole pipeline on the embedded digits data
# make test : create .venv, install mkdt with test tools, run ruff (lint + format), mypy and the test suite (what CI runs)
# make quick: the test suite without the tests marked slow, on 2 processes (a loop of about 2 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test quick lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/mkdt run --preset demo --out runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

quick: install
	$(BIN)/python -m pytest -q -m "not slow" -n 2

clean:
	rm -rf runs .pytest_cache
