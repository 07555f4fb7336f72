"""Which precision generates fastest on this machine: a short measurement, cached.

Greedy generation on a CPU is bound by different things on different processors: on one week's
AMD machine a student generated faster in bf16 than in fp32, on another week's Intel machine
2.4x slower (BENCHMARKS.md, "Issue #21"). So ``auto`` (the default of `kpod eval`, `kpod serve`
and the trainer's dev and test scoring) times a few greedy tokens of the model itself in both
precisions, at the batch size it will use, and keeps the faster one; the answer is cached per
processor, torch version, model shape and batch size in ``$KPOD_CACHE/generation-precision.json``,
so the measurement runs once per machine. On a GPU ``auto`` is bf16 where the GPU supports it; on
a CPU without fast bf16 matrix products (:func:`cpu_has_fast_bf16`) it is fp32, unmeasured.

The measurement times at most :data:`MAX_TIMED_ROWS` rows, whatever the batch (a batch of 128
is timed with 32 rows, and every batch from 32 up shares that answer): timed at the full batch it
cost more than the small dev evaluations it chose for, and the faster precision at 32 rows was
the faster one at 128 (BENCHMARKS.md, "Issue #21, session 26").

``KPOD_GENERATION_PRECISION=fp32`` (or ``bf16``) in the environment stands in for the measurement
(the test suite sets it, so its greedy outputs do not depend on the machine).

bf16 here means bf16 *weights* (a bf16 copy of the model for generation), not autocast, which
would cast every weight again at every generated token.

Training, token weighting and difficulty scoring choose by a rule instead
(:func:`compute_precision`): their ``precision: auto`` is bf16 autocast where bf16 products are
fast, fp32 where they are not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import time
from collections.abc import Iterator
from typing import Any, Literal

GenerationPrecision = Literal["auto", "fp32", "bf16"]
PRECISION_CHOICES = ("auto", "fp32", "bf16")
CACHE_FILE = "generation-precision.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MAX_TIMED_ROWS = 32
MEASURED_TOKENS = 32  # generated per row in a timed decoding (time_generation's new_tokens)


def timed_rows(batch_size: int) -> int:
    """The rows the measurement for ``batch_size`` times (and the batch size its answer is cached
    under): the batch itself up to :data:`MAX_TIMED_ROWS`, which stands in for larger ones."""
    return max(1, min(batch_size, MAX_TIMED_ROWS))


def cache_key(model: Any, batch_size: int) -> str:
    """Processor, threads, torch, model shape and batch size: what the answer depends on."""
    import torch

    config = getattr(model, "config", None)
    shape = [
        getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    ]
    # "v4": the timing method (a change of it must not reuse answers measured the old way; v3 timed
    # kpod's decoding loop instead of model.generate, v4 at most MAX_TIMED_ROWS rows)
    return f"v4|{_cpu_name()}|{torch.get_num_threads()}t|torch {torch.__version__}|{shape}|batch {batch_size}"


class _OverTime(Exception):
    """Raised inside a timed generation that has run past its limit."""


@contextlib.contextmanager
def _time_limit(model: Any, seconds: float | None) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` that starts more than ``seconds`` after the
    block began raises :class:`_OverTime` (``None``: no limit)."""
    if seconds is None:
        yield
        return
    deadline = time.perf_counter() + seconds

    def check(module: Any, args: Any, kwargs: Any) -> None:
        if time.perf_counter() > deadline:
            raise _OverTime

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def time_generation(
    model: Any,
    batch_size: int,
    new_tokens: int = MEASURED_TOKENS,
    prompt_tokens: int = 128,
    limit: float | None = None,
) -> float | None:
    """Generated tokens per second of greedy decoding of a random prompt batch, after a warm-up on
    the same shapes (oneDNN builds its bf16 kernels for each shape on first use: a warm-up on other
    shapes made bf16 look slower than fp32 where a real evaluation ran it 1.9x faster). The prompt
    length matters too: at batch 32 on one machine bf16 and fp32 were even with 64-token prompts
    and bf16 1.65x faster with 128 (a GSM8K prompt's length), so the default is 128. A causal model
    decodes with kpod's own loop (:func:`kpod.evaluate._greedy_compacting`, what its evaluations
    run; ``model.generate`` copies its KV cache at every step), every row for ``new_tokens``
    tokens; an encoder-decoder with ``model.generate``.

    With ``limit`` (seconds), ``None`` as soon as the timed decoding has taken longer than that
    (its rate is then below ``batch_size * new_tokens / limit``, which is all a comparison with a
    faster precision needs), or the warm-up has: it does the same prefill and fewer steps, so the
    timed decoding would too, unless first use cost most of it (measured: it does not,
    BENCHMARKS.md "Issue #21, session 30")."""
    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    if getattr(model.config, "is_encoder_decoder", False):
        start_id = model.config.decoder_start_token_id or 0

        def decode(n: int) -> None:
            model.generate(
                input_ids=ids,
                pad_token_id=0,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                decoder_start_token_id=start_id,
            )
    else:
        from kpod.evaluate import _greedy_compacting

        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def decode(n: int) -> None:
            _greedy_compacting(model, enc, None, n, set())  # no answer check, no end: n tokens

    with torch.no_grad():
        try:
            with _time_limit(model, limit):
                decode(4)
            start = time.perf_counter()
            with _time_limit(model, limit):
                decode(new_tokens)
        except _OverTime:
            return None
        seconds = time.perf_counter() - start
    if limit is not None and seconds > limit:
        return None  # its last forward pass began in time and ended after the limit
    return batch_size * new_tokens / seconds


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU's bf16 matrix products go to oneDNN's bf16 kernels (AVX512 or AMX, or
    ARM's bf16 extension), which PyTorch checks before routing a bf16 product there. Without them
    PyTorch's fallback computes a bf16 product at 1-1.3 GFLOP/s on one thread against fp32's 82-86
    (an AVX2-only AMD EPYC, BENCHMARKS.md "Issue #21, session 32"): a 60-90x slower product that
    made one token-weighting step take 100 s instead of 13."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN or the private check
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 products are fast on ``device_type``: a GPU that supports bf16, a CPU with
    oneDNN's bf16 kernels (:func:`cpu_has_fast_bf16`); not elsewhere."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_fast_bf16()


def compute_precision(precision: str, device_type: str) -> str:
    """The precision of training, token-weighting and difficulty passes (``train.precision``,
    ``weighting.precision``, ``difficulty.precision``) with ``auto`` resolved for ``device_type``:
    bf16 on a GPU that supports it and on a CPU with fast bf16 products
    (:func:`cpu_has_fast_bf16`), where bf16 autocast is what those settings were measured fastest
    with (BENCHMARKS.md, "Issue #21"); fp32 elsewhere. The environment's ``KPOD_PRECISION``
    (``fp32`` or ``bf16``) stands in for the rule (the test suite sets it so that its defaults do
    not depend on the machine). An explicit ``bf16`` is kept, with a warning where the CPU lacks
    fast bf16 products (once per calling line: Python's default warning filter); any other
    explicit value (``fp32``, ``fp16``) is returned as it is."""
    import os
    import warnings

    if precision == "auto":
        fixed = os.environ.get("KPOD_PRECISION")
        if fixed:
            if fixed not in ("fp32", "bf16"):
                from kpod.errors import ConfigError

                raise ConfigError(f"KPOD_PRECISION must be fp32 or bf16, got '{fixed}'")
            return fixed
        return "bf16" if fast_bf16(device_type) else "fp32"
    if precision == "bf16" and device_type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(
            "precision bf16 on a CPU without fast bf16 matrix products (AVX512 or AMX): bf16 products "
            "run tens of times slower than fp32 here; precision: auto chooses fp32 on this machine",
            stacklevel=2,
        )
    return precision


def bf16_copy(model: Any) -> Any:
    """A bf16 copy of ``model`` for generation (the original, e.g. being trained, is untouched),
    with LoRA adapters merged into the weights they adapt: merged in fp32 and rounded to bf16
    once, each adapted projection is one product per generated token instead of three and a
    scaled sum (measured in BENCHMARKS.md, "Issue #21, session 12")."""
    import torch

    low = copy.deepcopy(model)
    if hasattr(low, "merge_and_unload"):
        low = low.merge_and_unload()
    return low.to(torch.bfloat16).eval()


def choose(model: Any, batch_size: int, *, cache: bool = True) -> str:
    """``fp32`` or ``bf16``: the faster greedy generation of ``model`` here at ``batch_size`` rows
    (timed with at most :data:`MAX_TIMED_ROWS` of them; module docstring)."""
    import os

    import torch

    from kpod.io import write_json
    from kpod.models import cache_dir

    fixed = os.environ.get("KPOD_GENERATION_PRECISION")
    if fixed:
        if fixed not in ("fp32", "bf16"):
            from kpod.errors import ConfigError

            raise ConfigError(f"KPOD_GENERATION_PRECISION must be fp32 or bf16, got '{fixed}'")
        return fixed
    device = next(model.parameters()).device
    # A GPU by its support; a CPU without fast bf16 products unmeasured (timing bf16 there, tens
    # of times slower, would take minutes).
    if device.type == "cuda" or (device.type == "cpu" and not cpu_has_fast_bf16()):
        return "bf16" if fast_bf16(device.type) else "fp32"
    path = cache_dir() / CACHE_FILE
    rows = timed_rows(batch_size)
    key = cache_key(model, rows)
    known: dict[str, Any] = {}
    if cache and path.exists():
        with contextlib.suppress(ValueError, OSError):
            known = json.loads(path.read_text())
        if isinstance(known.get(key), dict) and known[key].get("choice") in ("fp32", "bf16"):
            return known[key]["choice"]
    was_training = model.training
    model.eval()
    low = bf16_copy(model)
    bf16 = time_generation(low, rows)
    del low
    # fp32 second, stopped once it has taken as long as bf16's timed decoding: it is then the
    # slower (the same choice as timing it whole; on a machine with fast bf16 products that saves
    # most of fp32's share, about half the measurement: BENCHMARKS.md "Issue #21, session 30").
    fp32 = None
    if next(model.parameters()).dtype == torch.float32:
        fp32 = time_generation(model, rows, limit=rows * MEASURED_TOKENS / bf16)
    model.train(was_training)
    choice = "bf16" if fp32 is None or bf16 > fp32 else "fp32"
    if cache:
        known[key] = {
            "choice": choice,
            "fp32_tokens_per_s": fp32,  # None: stopped early, slower than bf16
            "bf16_tokens_per_s": round(bf16, 1),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    return choice


def resolve(precision: str, model: Any, batch_size: int) -> str:
    """``precision`` with ``auto`` replaced by the measured choice."""
    if precision not in PRECISION_CHOICES:
        from kpod.errors import ConfigError

        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got '{precision}'")
    return choose(model, batch_size) if precision == "auto" else precision


@contextlib.contextmanager
def generation_model(model: Any, precision: str, batch_size: int) -> Iterator[tuple[Any, str]]:
    """The model to generate with in ``precision`` (``auto`` resolved) and the precision used:
    the model itself in fp32 (or when it already is bf16), a bf16 copy on CPU, the model under
    bf16 autocast on a GPU."""
    import torch

    chosen = resolve(precision, model, batch_size)
    dtype = next(model.parameters()).dtype
    if chosen == "fp32" or dtype == torch.bfloat16:
        yield model, chosen if dtype == torch.float32 else "bf16"
        return
    device = next(model.parameters()).device
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield model, chosen
        return
    low = bf16_copy(model)
    try:
        yield low, chosen
    finally:
        del low
