# Two commands a new user needs (see README): `make demo` and `make test`.
# Prerequisites: Python 3.10+ and make. Everything else goes into .venv with the pinned stack.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK ?= constraints/py$(PYVER).txt
PYTEST_ARGS ?=

.PHONY: demo test install install-test services-up services-down lock bench clean help

help:
	@echo "make demo          install (.venv) and run the end-to-end demo on this machine"
	@echo "make test          install with test extras and run the test suite"
	@echo "make services-up   start local Ray head, MLflow server and S3 server (127.0.0.1)"
	@echo "make services-down stop them"
	@echo "make bench         run the benchmarks in bench/"
	@echo "make lock          re-resolve the lock file for this Python ($(LOCK))"

$(LOCK):
	@echo "No lock file for Python $(PYVER) ($(LOCK)). Available: $$(ls constraints)." >&2
	@echo "Use a Python with a lock (PYTHON=python3.11 make ...), or create one with 'make lock'." >&2
	@exit 1

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<27"
	$(PY) -m pip install --constraint $(LOCK) --editable .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --constraint $(LOCK) --editable ".[test]"
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m cluster.demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: install-test
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

services-up: install
	$(PY) -m cluster.local up

services-down:
	$(PY) -m cluster.local down

bench: install-test
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade "pip>=24,<27"
	.lock-venv/bin/pip install --quiet --editable ".[test]"
	{ echo "# Exact versions of the whole stack for CPython $(PYVER), resolved $$(date +%F)."; \
	  echo "# Applied by make (pip install -c). Regenerate: make lock"; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e'; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .cache .pytest_cache
