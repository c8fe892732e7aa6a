# Set-up, the default run and the tests. Data and models are read from ../shared when it exists
# (override with PRUNE_DATA_DIR / PRUNE_MODELS_DIR); nothing from there is ever copied into the repo.
SHARED := $(abspath $(CURDIR)/../shared)
ifneq ($(wildcard $(SHARED)/data),)
export PRUNE_DATA_DIR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/models),)
export PRUNE_MODELS_DIR ?= $(SHARED)/models
endif

VENV := .venv
PYTHON := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test lint engine

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# without a CUDA driver, take the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install --quiet torch==2.13.0; fi
	$(PYTHON) -m pip install --quiet -e '.[test,lint]'
	touch $@

setup: $(VENV)/.installed

# llama.cpp's Python binding (optional: exported GGUF files run in the engine, and its tests run). A source
# build; portable AVX2 flags, since a native build can pick instruction paths the CPU cannot run.
ENGINE_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(VENV)/.engine: $(VENV)/.installed
	CMAKE_ARGS='$(ENGINE_CMAKE_ARGS)' $(PYTHON) -m pip install --quiet -e '.[engine]'
	touch $@

engine: $(VENV)/.engine

run: setup
	$(PYTHON) -m prune.run recipes/smollm2_30pct.yaml $(ARGS)

test: setup
	$(PYTHON) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
