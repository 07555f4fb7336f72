from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Greedy outputs in the tests must not depend on which precision generates faster on the machine
# (kpod.precision); tests of that choice unset it.
os.environ.setdefault("KPOD_GENERATION_PRECISION", "fp32")
# Likewise the precision of training, weighting and difficulty (kpod.precision.compute_precision):
# the tests' defaults run as they were written, bf16 autocast, whether or not this CPU has fast
# bf16 products; tests of the rule unset it.
os.environ.setdefault("KPOD_PRECISION", "bf16")


@pytest.fixture
def shared_data() -> Path:
    """The shared reasoning data beside the checkout; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (present beside every kpod checkout and in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> Path:
    """A tiny random LLaMA-style causal LM with a tiny BPE tokenizer and a chat template."""
    from tiny_models import build_causal

    return build_causal(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> Path:
    """A tiny random T5-style encoder-decoder with the same tokenizer."""
    from tiny_models import build_seq2seq

    return build_seq2seq(tmp_path_factory.mktemp("tiny-seq2seq"))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """Loads a script of benchmarks/ as a module (the scripts import their sibling ``common``)."""
    import importlib.util
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
