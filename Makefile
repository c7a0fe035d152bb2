# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv and installs pinned
# dependencies (torch 2.13.0 CPU wheel; no resolver backtracking): the core from pyproject.toml, then the JAX
# `gemma` and keras-hub stacks from requirements/*.txt with --no-deps (every transitive dependency is pinned
# there; see DEVELOPERS.md for why gemma, kauldron and keras-hub must not resolve their own dependencies).
# `make test` also builds litgpt's own environment (.venv-litgpt, requirements/litgpt.txt) and the library-version
# environment the tests compare against (hf==5.22.0, in the user cache), so CI runs those tests too.
# llama.cpp (`make llamacpp`, part of `make test`): requirements/llamacpp.txt builds llama-cpp-python from its source
# archive (~15-25 min the first time; pip caches the wheel), then the archive's vendored converter
# (convert_hf_to_gguf.py, conversion/, gguf-py) is extracted into $(VENV)/share/bughunt. `make demo` never builds it.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# litgpt's own environment (its huggingface-hub pin breaks .venv's transformers); bughunt finds it here, beside .venv.
LITGPT_VENV = .venv-litgpt
# the older transformers release the tests compare against `hf` (a library-version environment in the user cache)
TEST_ENVS = hf==5.22.0

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3

$(VENV)/.core: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stacks: $(VENV)/.core requirements/keras.txt requirements/jax.txt requirements/mlx.txt requirements/real.txt
	$(PIP) install -q --no-deps -r requirements/keras.txt -r requirements/jax.txt -r requirements/mlx.txt -r requirements/real.txt
	touch $@

$(VENV)/.test: $(VENV)/.stacks
	$(PIP) install -q -e '.[test]'
	touch $@

# Built beside its final place and renamed into it, so bughunt never sees a half-installed environment.
$(LITGPT_VENV)/.installed: $(VENV)/bin/python requirements/litgpt.txt
	rm -rf $(LITGPT_VENV).tmp
	$(PY) -m venv --without-pip $(LITGPT_VENV).tmp
	$(PIP) --python $(LITGPT_VENV).tmp/bin/python install -q --no-deps -r requirements/litgpt.txt
	$(LITGPT_VENV).tmp/bin/python -c "import litgpt, torch, numpy, ml_dtypes, pydantic"
	touch $(LITGPT_VENV).tmp/.installed
	rm -rf $(LITGPT_VENV) && mv $(LITGPT_VENV).tmp $(LITGPT_VENV)

litgpt: $(LITGPT_VENV)/.installed

# Library-version environments the tests use, created (or found) in the user cache: `bughunt envs list` shows them.
envs: $(VENV)/.core
	$(VENV)/bin/bughunt envs create $(TEST_ENVS)

LLAMACPP_VERSION = 0.3.36
LLAMACPP_CMAKE_ARGS = -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_BLAS=OFF
LLAMACPP_SDIST = $(VENV)/share/bughunt/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz

$(VENV)/.llamacpp: $(VENV)/.core requirements/llamacpp.txt
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install -q --no-deps -r requirements/llamacpp.txt
	$(PIP) download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMACPP_VERSION) -d $(VENV)/share/bughunt/sdist
	$(VENV)/bin/python -m bughunt.implementations.gguf_convert extract $(LLAMACPP_SDIST) --cmake-args "$(LLAMACPP_CMAKE_ARGS)"
	touch $@

llamacpp: $(VENV)/.llamacpp

llamacpp-cmake-args:
	@echo "$(LLAMACPP_CMAKE_ARGS)"

demo: $(VENV)/.stacks
	$(VENV)/bin/bughunt demo

test: $(VENV)/.test $(VENV)/.llamacpp $(LITGPT_VENV)/.installed envs wheel-check
	$(VENV)/bin/python -m pytest -q --durations=25

# The tests not marked `slow` (every test file keeps some): a few minutes on 2 cores, for the edit-test loop.
test-fast: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=10

# Build the wheel, install it into a fresh virtual environment (not editable) and run bughunt from outside the
# repository: a package or data file the wheel leaves out fails here (see .ci/wheel-check).
wheel-check:
	.ci/wheel-check $(PY)

.PHONY: demo test test-fast wheel-check litgpt envs llamacpp llamacpp-cmake-args
