# The two commands, from a fresh clone:
#
#     make demo    # the embedded demo: synthetic data, CPU, train, evaluate, pictures
#     make test    # the test suite (what .ci/run runs)
#
# Each creates the virtual environment .venv on first use (torch pinned, this package editable, the extras the
# command needs) and reuses it afterwards. `make demo ARGS="--out runs/mine"` passes arguments on;
# `make test ARGS=tests/dataio` runs part of the suite; PYTHON=python3.12 picks the interpreter and
# TORCH="torch==2.13.0 ..." another torch build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test

demo: $(VENV)/.demo-ready
	$(PY) -m smoothsa.train $(ARGS)

test: $(VENV)/.test-ready
	$(PY) -m pytest -q $(ARGS)

$(VENV)/.torch-ready:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || \
		{ echo "error: smoothsa needs Python >= 3.10 as $(PYTHON); run e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 2; }
	@$(PYTHON) -m venv $(VENV) || \
		{ echo "error: $(PYTHON) cannot create a virtual environment (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 2; }
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: anything that merely asks for "torch" could pull another build.
	$(PY) -m pip install --quiet $(TORCH)
	@touch $@

$(VENV)/.demo-ready: $(VENV)/.torch-ready setup.py
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.test-ready: $(VENV)/.torch-ready setup.py
	$(PY) -m pip install --quiet -e ".[test,video,convert,tensorboard]"
	@touch $@
