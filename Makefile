# Two entry points on a fresh machine: `make demo` (set up, then run the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) parallel_runner.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check .
