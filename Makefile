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
# Programs the tests run as they are (Debian packages): dciodvfy (dicom3tools) checks the
# DICOM SEG exports; Orthanc with its DICOMweb plugin is the PACS. Installed with apt where
# missing and we may (root); elsewhere those tests are skipped, with a reason.
APT_FOR_TESTS := dicom3tools orthanc orthanc-dicomweb
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	missing=$$(for p in $(APT_FOR_TESTS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
	  deny=/usr/sbin/policy-rc.d; made=; \
	  [ -e $$deny ] || { printf '#!/bin/sh\nexit 101\n' > $$deny && chmod +x $$deny && made=1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; rc=$$?; \
	  [ -z "$$made" ] || rm -f $$deny; [ $$rc = 0 ]; fi
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
