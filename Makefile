# Two entry points: `make demo` runs the main job on embedded defaults, `make test` runs the tests.
# Both create .venv on first use and install the project into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test test-fast demo bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# constraints.txt is the lock: the same versions here, in CI and in deploy/Containerfile.
# dciodvfy (dicom3tools) checks the DICOM SEG exports in the tests: installed with apt
# where it is missing and we may (root); elsewhere those checks are skipped, with a reason.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	command -v dciodvfy >/dev/null || [ "$$(id -u)" != 0 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null; }
	touch $(STAMP)

# pytest exits 5 when it collects nothing: say so and fail, rather than pass silently.
# tests/isolated.sh: the servers the tests start are reachable from loopback only.
test: $(STAMP)
	sh tests/isolated.sh $(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests'; fi; exit $$rc

# The edit loop: everything but the tests marked slow.
test-fast: $(STAMP)
	sh tests/isolated.sh $(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/segpipe demo

# MONAI, for the comparison, comes with the bench extra.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run_all.py

# Re-resolve the lock from pyproject.toml in a scratch venv (then run make test).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' | grep -v '^segpipe'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache
