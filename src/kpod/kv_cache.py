"""The key/value cache of kpod's greedy decoding loop: grown in place, rows dropped and joined.

transformers' ``DynamicCache`` appends each generated position with ``torch.cat``, copying every
layer's whole cache at every step. At the batch sizes where decoding a small model on a CPU is
efficient, that copy was the largest cost of a step (SmolLM2-135M, batch 128, 400 cached
positions: 36 % of the step, more than the weights' matrix products; BENCHMARKS.md, "Issue #21,
session 13"). Here each layer's keys and values live in buffers with room to spare, written in
place and doubled when full, so a step copies only its new position; the attention reads views of
the filled part (PyTorch's SDPA takes them without a copy).

:func:`kpod.evaluate._greedy_compacting` also drops finished rows (``batch_select_indices``) and
joins a newly prefilled group of rows to the live ones (:func:`join`), the shorter padded on the
left with zeros that the attention mask hides.
"""

from __future__ import annotations

from typing import Any

import torch

from kpod.models import inner_model

# Room left after the positions a buffer is (re)allocated for.
INITIAL_ROOM = 64

_LAYER: type | None = None


def _layer_class() -> type:
    """``GrowingLayer``, built on transformers' ``DynamicLayer`` on first use (kpod imports
    transformers lazily)."""
    global _LAYER
    if _LAYER is not None:
        return _LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """One layer's keys and values in buffers with spare room along the position axis;
        ``keys`` and ``values`` are views of the filled part."""

        def __init__(self, window: int | None = None) -> None:
            super().__init__()
            self.length = 0
            self.window = window
            self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def _set(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
            self.buffers, self.length = (k, v), length
            self.keys, self.values = k[:, :, :length], v[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[2]
            if self.window is not None and end > self.window:
                raise ValueError(
                    f"a sequence of {end} positions exceeds the model's sliding attention window "
                    f"({self.window}), which kpod's decoding loop does not implement; "
                    "generate with compact=False"
                )
            if self.buffers is None or end > self.buffers[0].shape[2]:
                size = end + INITIAL_ROOM
                if self.buffers is not None:
                    size = max(size, 2 * self.buffers[0].shape[2])
                k = key_states.new_empty(*key_states.shape[:2], size, key_states.shape[3])
                v = value_states.new_empty(*value_states.shape[:2], size, value_states.shape[3])
                if self.length:
                    k[:, :, : self.length] = self.keys
                    v[:, :, : self.length] = self.values
                self._set(k, v, self.length)
            k, v = self.buffers
            k[:, :, self.length : end] = key_states
            v[:, :, self.length : end] = value_states
            self._set(k, v, end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.buffers is not None:
                # The kept rows' filled positions and INITIAL_ROOM more, not the whole capacity
                # (up to twice the filled length after a doubling): one copy of what is needed.
                end = min(self.buffers[0].shape[2], self.length + INITIAL_ROOM)
                k, v = (b[:, :, :end][indices] for b in self.buffers)
                self._set(k, v, self.length)

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("kpod's growing cache is not cropped")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("kpod's growing cache is not repeated")

    _LAYER = GrowingLayer
    return GrowingLayer


def growing_cache(model: Any) -> Any:
    """An empty transformers cache (a ``DynamicCache``) with one growing layer per decoder layer
    of ``model`` (a transformers model or a peft wrapper of one)."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    config = inner_model(model).config.get_text_config(decoder=True)
    # Layers with sliding-window attention (Mistral, Gemma, ...) see the same positions as full
    # attention while a sequence fits the window; beyond it their cache would differ: refused.
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) if any("sliding" in t for t in types) else None
    layer = _layer_class()
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(cache, layers=[layer(window) for _ in range(config.num_hidden_layers)])
    return cache


def join(live: Any, new: Any, drop: int, pad_live: int, pad_new: int) -> None:
    """Append the rows of cache ``new`` to cache ``live`` (both from :func:`growing_cache`), in
    place: ``live`` loses its first ``drop`` positions (padding in all its rows), then the shorter
    of the two is padded on the left (``pad_live`` and ``pad_new`` zero positions) so both have the
    same length."""
    for a, b in zip(live.layers, new.layers, strict=True):
        width = a.length - drop + pad_live
        assert width == b.length + pad_new, "joined caches must have one length"
        n_live = a.keys.shape[0]
        buffers = []
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            joined = x.new_zeros(n_live + y.shape[0], x.shape[1], width + INITIAL_ROOM, x.shape[3])
            joined[:n_live, :, pad_live:width] = x[:, :, drop:]
            joined[n_live:, :, pad_new:width] = y
            buffers.append(joined)
        a._set(*buffers, width)


# ``batch_size: auto`` for generation: the most rows whose key/value cache fits this many bytes on a
# CPU (kept fixed rather than read from the memory free at the time, so that a machine resolves the
# same batch every time and an interrupted evaluation resumes with it) or this share of a GPU's
# memory, and no more than MAX_AUTO_BATCH rows: the largest batch measured on a CPU (BENCHMARKS.md,
# "Issue #21": a 2-core CPU decodes SmolLM2-135M 3x faster at batch 128 than at 16, because a step
# streams every weight from memory once however many rows it carries).
AUTO_BATCH_CPU_BYTES = 2 * 2**30
AUTO_BATCH_GPU_SHARE = 0.25
MAX_AUTO_BATCH = 128
# ``auto`` where a model's config does not say how large its cache is (today's fixed default).
FALLBACK_BATCH = 16


def cache_bytes_per_position(model: Any, bytes_per_value: int) -> int | None:
    """Bytes that one position of one sequence adds to the key/value cache of ``model`` (keys and
    values of every decoder layer), or ``None`` if its config does not say. For an
    encoder-decoder model the cross-attention keys and values of the encoder's positions are
    counted as if they were decoder positions (an upper bound)."""
    config = inner_model(model).config
    text = config.get_text_config(decoder=True)

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    layers = first("num_decoder_layers", "num_hidden_layers", "num_layers")
    heads = first("num_attention_heads", "num_heads")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim", "d_kv")
    hidden = first("hidden_size", "d_model")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        return None
    per_position = 2 * layers * kv_heads * head_dim * bytes_per_value
    return 2 * per_position if getattr(config, "is_encoder_decoder", False) else per_position


def cache_budget(device: Any) -> int:
    """Bytes of key/value cache ``batch_size: auto`` allows on ``device``."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(AUTO_BATCH_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return AUTO_BATCH_CPU_BYTES


def auto_batch_size(model: Any, positions: int, bytes_per_value: int, budget: int | None = None) -> int:
    """The batch size of ``batch_size: auto``: the largest power of two up to
    :data:`MAX_AUTO_BATCH` whose rows' key/value caches fit ``budget`` bytes (default
    :func:`cache_budget` of the model's device), each row holding ``positions`` positions (prompt and
    new tokens) twice over: a growing buffer doubles when full, so it can hold up to twice what it
    is filled with. At least 1; :data:`FALLBACK_BATCH` where the model's cache size is not known."""
    per_position = cache_bytes_per_position(model, bytes_per_value)
    if per_position is None:
        return FALLBACK_BATCH
    if budget is None:
        budget = cache_budget(next(model.parameters()).device)
    rows = budget // (2 * max(1, positions) * per_position)
    batch = 1
    while batch * 2 <= min(rows, MAX_AUTO_BATCH):
        batch *= 2
    return batch
