"""``precision: auto`` for training, token weighting and difficulty scoring
(:func:`kpod.precision.compute_precision`): bf16 autocast only where this machine's bf16 matrix
products are fast, fp32 elsewhere; and generation's ``auto`` not timing bf16 where they are slow."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from kpod import precision
from kpod.data.synthetic import arithmetic_examples
from kpod.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """Set whether the CPU has fast bf16 products: ``machine(True)`` / ``machine(False)``."""
    monkeypatch.delenv("KPOD_PRECISION", raising=False)

    def set_fast(fast: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)

    return set_fast


def test_auto_is_bf16_only_where_bf16_products_are_fast(machine, monkeypatch) -> None:
    machine(False)
    assert precision.compute_precision("auto", "cpu") == "fp32"
    assert precision.compute_precision("fp32", "cpu") == "fp32"
    with pytest.warns(UserWarning, match="without fast bf16"):
        assert precision.compute_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    machine(True)
    assert precision.compute_precision("auto", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.compute_precision("bf16", "cpu") == "bf16"  # no warning where it is fast
    assert precision.compute_precision("fp16", "cuda") == "fp16"
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.compute_precision("auto", "cuda") == expected
    assert precision.compute_precision("auto", "mps") == "fp32"
    monkeypatch.setenv("KPOD_PRECISION", "fp32")
    assert precision.compute_precision("auto", "cpu") == "fp32"  # the environment decides
    monkeypatch.setenv("KPOD_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="KPOD_PRECISION"):
        precision.compute_precision("auto", "cpu")


def test_the_fast_bf16_check_says_no_on_a_cpu_without_avx512() -> None:
    """PyTorch's own answer (oneDNN's bf16 check) agrees with the CPU's instruction set where that
    decides it: an AVX2-only x86 CPU has no fast bf16 products."""
    fast = precision.cpu_has_fast_bf16()
    assert isinstance(fast, bool)
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        assert not fast


def test_generation_on_a_cpu_without_fast_bf16_is_fp32_unmeasured(machine, tiny_causal, monkeypatch) -> None:
    """Timing bf16 generation there would take minutes (1 GFLOP/s products); ``auto`` is fp32 at
    once, and nothing is timed."""
    from kpod.models import load_model

    monkeypatch.delenv("KPOD_GENERATION_PRECISION", raising=False)
    machine(False)

    def timed(*args, **kwargs):
        raise AssertionError("timed a generation")

    monkeypatch.setattr(precision, "time_generation", timed)
    model = load_model(str(tiny_causal), trainable=False).model
    assert precision.choose(model, 16, cache=False) == "fp32"


def _auto_follows_the_rule(machine, run) -> None:
    """``run("auto")`` gives fp32's result bit for bit on a CPU without fast bf16 products and
    bf16's on one with them; the two differ (bf16 really ran)."""
    fp32, bf16 = run("fp32"), run("bf16")
    assert fp32 != bf16
    machine(False)
    assert run("auto") == fp32
    machine(True)
    assert run("auto") == bf16


def test_auto_runs_difficulty_as_the_rule_says(machine, tiny_causal) -> None:
    """Difficulties under ``auto`` equal fp32's bit for bit on a machine without fast bf16, and
    bf16's on one with it (which differ from fp32's by rounding)."""
    from kpod.models import load_model
    from kpod.progressive.difficulty import score_difficulties

    student = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(4, seed=5)

    def scored(p: str) -> dict[str, list[float]]:
        return score_difficulties(examples, student, None, batch_size=2, progress=False, precision=p)

    _auto_follows_the_rule(machine, scored)


def test_auto_runs_token_weighting_as_the_rule_says(machine, tiny_causal) -> None:
    from kpod.weighting.config import WeightingConfig
    from kpod.weighting.train import train_weighting

    examples = arithmetic_examples(8, seed=5)
    base = WeightingConfig.from_settings(
        dict(student=str(tiny_causal), num_heads=2, mlp_hidden=16, batch_size=4, max_steps=2)
    )
    assert base.precision == "auto"  # the default

    def history(p: str) -> list[dict[str, float]]:
        _, steps = train_weighting(examples, dataclasses.replace(base, precision=p), progress=False)
        return [{k: v for k, v in h.items() if k != "seconds"} for h in steps]

    _auto_follows_the_rule(machine, history)


def test_auto_trains_as_the_rule_says_and_records_it(machine, tiny_causal, tmp_path) -> None:
    from kpod.distill.methods import StageBuilder, get_method
    from kpod.distill.trainer import TrainConfig, train
    from kpod.models import load_model

    examples = arithmetic_examples(4, seed=3)
    assert TrainConfig(method="std-cot").precision == "auto"  # the default

    def run(p: str, name: str):
        student = load_model(str(tiny_causal))
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        config = TrainConfig(method="std-cot", epochs=1, batch_size=2, precision=p, lr=1e-2, seed=0)
        return train(config, student, builder, tmp_path / name, progress=False)

    fp32, bf16 = run("fp32", "fp32"), run("bf16", "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert fp32.stage_loss != bf16.stage_loss
    machine(False)
    slow = run("auto", "auto-slow")
    assert slow.precision == "fp32" and slow.stage_loss == fp32.stage_loss
    machine(True)
    fast = run("auto", "auto-fast")
    assert fast.precision == "bf16" and fast.stage_loss == bf16.stage_loss
