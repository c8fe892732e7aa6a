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

.PHONY: setup run test lint engine gpu-wheels gpu-check

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

# The GPU check (benchmarks/gpu_check.py): what a short GPU lease runs, about 8 minutes on one H200. A GPU machine
# without network runs it with the machine's own torch and the wheels carried in .whl/, which gpu-wheels downloads
# (for Python 3.12 on x86-64 Linux) on a machine with network.
GPU_WHEELS := transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 httpx2==2.16.2 httpcore2==2.16.2 \
	truststore==0.10.5 tomlkit==0.15.3 click==8.5.1 hf-xet==1.8.0 idna==3.20 gguf==0.19.0
gpu-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	bash benchmarks/gpu_check.sh --out gpu_check $(ARGS)
