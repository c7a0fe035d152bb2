# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv, installs pinned
# dependencies (torch 2.13.0 CPU wheel; no resolver backtracking), then runs.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3

$(VENV)/.core: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/bughunt demo

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

.PHONY: demo test
