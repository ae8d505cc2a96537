# Two entry points on a fresh machine: `make demo` (set up, then run the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-ray demo test test-fast lint

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# Ray is optional for users (the ray executor); the tests exercise it, so `make test` installs it.
$(VENV)/.installed-ray: $(VENV)/.installed requirements-ray.txt
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-ray.txt
	touch $@

setup-ray: $(VENV)/.installed-ray

demo: setup
	$(PY) parallel_runner.py

test: setup-ray
	$(PY) -m pytest -q

# The developer loop: every test not marked slow (pyproject.toml lists the markers); `make test` and CI run them all.
# Needs Ray too: test_runner_ray.py imports it at collection, even when its tests are deselected.
test-fast: setup-ray
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check .
