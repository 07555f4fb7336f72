"""A local Hugging Face model answering chat messages: a teacher without a server, and what
``kpod serve`` serves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kpod.teacher.client import Completion


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _render_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model's chat template, or a plain transcript for models without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class LocalChatModel:
    """Greedy or sampled chat completions from a local model; thread-safe (one generation at a time)."""

    def __init__(self, name_or_path: str, *, precision: str = "auto", device: str | None = None) -> None:
        """``precision``: ``fp32``, ``bf16``, ``fp16`` (GPU) or ``auto``: the faster of fp32 and bf16
        for one request at a time on this machine (:mod:`kpod.precision`, measured once, cached)."""
        from kpod.models import load_model

        loaded = load_model(
            name_or_path, dtype="fp32" if precision == "auto" else precision, device=device, trainable=False
        )
        if precision == "auto":
            import torch

            from kpod.precision import choose

            self.precision = choose(loaded.model, batch_size=1)
            if self.precision == "bf16":
                loaded.model.to(torch.bfloat16)
        else:
            self.precision = precision
        self.name = name_or_path
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.kind = loaded.kind
        self._lock = threading.Lock()

    def _inputs(self, messages: list[dict[str, str]]):
        prompt = _render_messages(self.tokenizer, messages)
        special = not getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=special).to(self.model.device)

    def _generate_kwargs(self, temperature: float, max_tokens: int, seed: int | None) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        import torch

        with self._lock:
            inputs = self._inputs(messages)
            with torch.no_grad():
                out = self.model.generate(**inputs, **self._generate_kwargs(temperature, max_tokens, seed))
        n_prompt = inputs["input_ids"].shape[1] if self.kind == "causal" else 0
        new = out[0, n_prompt:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop or [])
        hit_eos = self.tokenizer.eos_token_id in new.tolist()
        finish = "stop" if stopped or hit_eos or len(new) < max_tokens else "length"
        return ChatResult(text, finish, int(inputs["input_ids"].shape[1]), int(len(new)))

    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; the last piece is followed by nothing."""
        import torch
        from transformers import TextIteratorStreamer

        with self._lock:
            inputs = self._inputs(messages)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = dict(**inputs, **self._generate_kwargs(temperature, max_tokens, seed), streamer=streamer)

            def run() -> None:
                with torch.no_grad():
                    self.model.generate(**kwargs)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            emitted = ""
            stopped = False
            for piece in streamer:
                candidate, stopped = _cut_at_stop(emitted + piece, stop or [])
                if len(candidate) > len(emitted):
                    yield candidate[len(emitted) :]
                    emitted = candidate
                if stopped:
                    break
            if stopped:
                # Drain so the generating thread can finish (an exhausted streamer would block).
                for _ in streamer:
                    pass
            thread.join()


class LocalTeacher:
    """The teacher interface of :class:`kpod.teacher.client.ChatClient`, over a local model."""

    def __init__(self, name_or_path: str, **kwargs: Any) -> None:
        # fp32 unless told otherwise, as before ``auto`` existed: the store's records do not name
        # the precision, so a rationale must not depend on which one a machine measured faster.
        kwargs.setdefault("precision", "fp32")
        self.chat_model = LocalChatModel(name_or_path, **kwargs)
        self.model = name_or_path

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        start = time.perf_counter()
        result = await asyncio.to_thread(
            self.chat_model.chat, messages, temperature=temperature, max_tokens=max_tokens, seed=seed
        )
        return Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            usage={"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            model=self.model,
            latency_s=round(time.perf_counter() - start, 4),
            attempts=1,
        )

    async def aclose(self) -> None:
        return None
