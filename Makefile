# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv and installs pinned
# dependencies (torch 2.13.0 CPU wheel; no resolver backtracking): the core from pyproject.toml, then the JAX
# `gemma` and keras-hub stacks from requirements/*.txt with --no-deps (every transitive dependency is pinned
# there; see DEVELOPERS.md for why gemma, kauldron and keras-hub must not resolve their own dependencies).
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3

$(VENV)/.core: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stacks: $(VENV)/.core requirements/keras.txt requirements/jax.txt requirements/mlx.txt
	$(PIP) install -q --no-deps -r requirements/keras.txt -r requirements/jax.txt -r requirements/mlx.txt
	touch $@

$(VENV)/.test: $(VENV)/.stacks
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.stacks
	$(VENV)/bin/bughunt demo

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

.PHONY: demo test
