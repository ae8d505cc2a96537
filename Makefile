# Two entry points on a fresh machine: `make demo` (set up, then run the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-ray setup-slurm demo test test-fast lint

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

# submitit is optional too (the slurm executor); the tests run it against a real single-node SLURM cluster
# (tests/slurm_cluster.py installs slurm-wlm and munge with apt-get when they are missing: root, as in CI).
$(VENV)/.installed-slurm: $(VENV)/.installed requirements-slurm.txt
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-slurm.txt
	touch $@

setup-slurm: $(VENV)/.installed-slurm

demo: setup
	$(PY) parallel_runner.py

test: setup-ray setup-slurm
	$(PY) -m pytest -q

# The developer loop: every test not marked slow (pyproject.toml lists the markers); `make test` and CI run them all.
# Needs Ray and submitit too: test_runner_ray.py and test_slurm.py import them at collection, even when deselected.
test-fast: setup-ray setup-slurm
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check .
