"""Evaluation by answer accuracy: batched greedy generation and the data layer's answer extractor.

Generation: prompts rendered by the shared prompt module (question only: the student writes the
whole rationale), sorted by length so batches carry little padding, left-padded for decoder-only
models, greedy with the KV cache, and stopped per sequence once the answer phrase is complete
(end-of-sequence, or a newline or sentence end after "Therefore, the answer is ..."). Accuracy
comes with a 95 % Wilson score interval, and every prediction is written to JSONL.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kpod.data.answers import ANSWER_PHRASE, answers_match, extract_answer_detail
from kpod.data.schema import Example
from kpod.errors import DataError
from kpod.io import write_jsonl
from kpod.lock import holds_lock
from kpod.models import last_positions
from kpod.prompt import PromptFormat, render_prompt
from kpod.stats import wilson_interval

# Part of every resume key: generations recorded by another decoding path (another version of this
# module's loop, adapters merged or not) are not mixed with this one's. 2: the compacting loop and
# bf16 copies with merged adapters (session 12).
GENERATION_VERSION = 2

_COMPLETE = re.compile(re.escape(ANSWER_PHRASE) + r"[^\n]*?(\n|[.!?](\s|$))", re.IGNORECASE)


def answer_complete(text: str) -> bool:
    """Whether generated text has finished its answer phrase ("... the answer is 72." + space/end)."""
    match = _COMPLETE.search(text)
    if match is None:
        return False
    # "is 7." could still become "is 7.5": a final period right after a digit is not an end yet.
    return not (match.group(0).endswith(".") and re.search(r"\d\.$", text) is not None)


# The generated tokens decoded to check for a complete answer phrase (it fits well within them).
STOP_WINDOW = 48


def _answers_complete(tokenizer: Any, generated: torch.Tensor) -> list[bool]:
    """Per row of generated token ids: whether its last :data:`STOP_WINDOW` tokens finish the
    answer phrase (one batched decode; the stop rule of both generation paths)."""
    texts = tokenizer.batch_decode(generated[:, -STOP_WINDOW:], skip_special_tokens=True)
    return [answer_complete(t) for t in texts]


class _StopOnAnswer:
    """A transformers stopping criterion: per sequence, stop once its answer phrase is complete."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        complete = _answers_complete(self.tokenizer, input_ids[:, self.prompt_length :])
        return torch.tensor(complete, dtype=torch.bool, device=input_ids.device)


def _greedy_compacting(
    model: Any, enc: Any, tokenizer: Any, max_new_tokens: int, eos: set[int]
) -> list[list[int]]:
    """Greedy continuations of a left-padded batch of a causal model, each sequence's tokens up to
    and including the one that ends it (end-of-sequence, or its answer phrase complete), with
    finished sequences dropped from the batch as they end.

    ``model.generate`` keeps a finished sequence in the batch, computing tokens that are thrown
    away, until the last sequence of the batch ends; here the KV cache, attention mask and
    positions of the finished rows are removed at once (``DynamicCache.batch_select_indices``), so
    a batch costs the sum of its lengths, not its size times its longest. Same model calls as
    greedy ``generate`` otherwise: one prefill with positions from the mask, then one token per
    step (a smaller batch can round differently in bf16, the measured effect is in BENCHMARKS.md).
    """
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # transformers 5 renames forward's ``past_key_values`` to ``cache`` (the old name is deprecated).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=last_positions(ids.shape[1], 1, ids.device),
        **{key: cache},
    )
    alive = list(range(ids.shape[0]))
    tokens: list[list[int]] = [[] for _ in alive]
    last = positions[:, -1]
    tail = ids.new_zeros(len(alive), 0)  # the live rows' last STOP_WINDOW tokens, for the stop check
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1, :].argmax(-1)
        tail = torch.cat([tail[:, 1 - STOP_WINDOW :], nxt[:, None]], dim=1)
        complete = _answers_complete(tokenizer, tail)
        keep = []
        for row, (b, t) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            tokens[b].append(t)
            if t not in eos and not complete[row]:
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(rows)
            mask, last, nxt, tail = mask[rows], last[rows], nxt[rows], tail[rows]
            alive = [alive[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        last = last + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            use_cache=True,
            **{key: cache},
        )
    return tokens


def _generate_batch(
    model: Any, tokenizer: Any, enc: Any, kind: str, max_new_tokens: int, compact: bool
) -> list[str]:
    """One tokenised batch's greedy continuations, decoded."""
    from transformers import StoppingCriteriaList

    if compact and kind == "causal":
        eos = model.generation_config.eos_token_id  # what model.generate stops on
        eos = tokenizer.eos_token_id if eos is None else eos
        eos = set(eos) if isinstance(eos, list) else {eos}
        new = _greedy_compacting(model, enc, tokenizer, max_new_tokens, eos)
    else:
        prompt_length = enc["input_ids"].shape[1] if kind == "causal" else 1
        stop = StoppingCriteriaList([_StopOnAnswer(tokenizer, prompt_length)])
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            stopping_criteria=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[:, enc["input_ids"].shape[1] :] if kind == "causal" else generated
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    kind: str = "causal",
    batch_size: int = 16,
    max_new_tokens: int = 256,
    add_special_tokens: bool = True,
    progress: bool = True,
    done: dict[int, str] | None = None,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
    compact: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (in their order), batched by length.

    ``compact`` (causal models): finished sequences leave the batch as they end
    (:func:`_greedy_compacting`) instead of being carried to the end of the batch's longest one
    by ``model.generate``.

    ``done`` maps prompt indices to continuations already generated (by an earlier, interrupted
    call with the same prompts and settings): a batch whose prompts are all there is not generated
    again, so the remaining batches are exactly those of an uninterrupted call (a batch's padding
    can change bf16 results, so a partly done batch is generated whole). ``on_batch(indices, texts)``
    is called after each generated batch (to record progress).
    """
    done = done or {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if kind == "causal" else "right"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[start : start + batch_size]
            if all(i in done for i in idx):
                for i in idx:
                    out[i] = done[i]
                continue
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            texts = _generate_batch(model, tokenizer, enc, kind, max_new_tokens, compact)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
            if on_batch is not None:
                on_batch(idx, texts)
    finally:
        tokenizer.padding_side = side
    return out


@dataclass
class EvalResult:
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    seconds: float
    generated_tokens: int
    predictions: list[dict[str, Any]]
    precision: str = "fp32"

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": round(100 * self.accuracy, 2),
            "ci95": [round(100 * x, 2) for x in self.ci95],
            "seconds": round(self.seconds, 1),
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": round(self.generated_tokens / self.seconds, 1) if self.seconds else None,
            "precision": self.precision,
        }


@holds_lock("out", directory=False)
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    kind: str = "causal",
    fmt: PromptFormat | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    out: Path | None = None,
    question_prefix: str = "",
    progress: bool = True,
    resume_key: str | None = None,
    precision: str = "fp32",
    compact: bool = True,
) -> EvalResult:
    """Accuracy of a model on ``examples`` (one per question), with every prediction recorded.

    ``question_prefix`` goes before each question (the ``[label]`` task of distilling
    step-by-step).

    With ``out`` and ``resume_key`` (a string that identifies the model's weights, e.g. from
    :func:`weights_fingerprint`), the generations are also appended batch by batch to
    ``OUT.partial`` (a :class:`kpod.teacher.store.RationaleStore`: complete lines survive a kill); a
    later call with the same key, prompts and generation settings reuses them and generates only the
    rest, so a killed evaluation loses at most one batch. The partial file is removed once ``out``
    is written. Records of another key or settings are ignored. ``out`` has one writer at a time
    (its lock, ``OUT.lock``, is held throughout).

    ``precision``: ``fp32``, ``bf16`` (a bf16 copy of the model generates) or ``auto`` (the faster
    of the two on this machine, measured once and cached: :mod:`kpod.precision`); the one used is
    in the result and in the resume key. ``compact``: see :func:`generate`.
    """
    from kpod.precision import generation_model, resolve

    precision = resolve(precision, model, batch_size)
    if resume_key is not None:
        resume_key = f"{resume_key}:{precision}:{GENERATION_VERSION}"
    fmt = fmt or PromptFormat()
    questions = list({e.qid: e for e in examples}.values())
    prompts = [render_prompt(question_prefix + e.question, fmt, tokenizer) for e in questions]
    store = None
    done: dict[int, str] = {}
    if out is not None and resume_key is not None:
        # The teacher's crash-safe store, keyed by (qid, model fingerprint, prompt and settings, 0).
        from kpod.teacher.store import RationaleStore, record_key

        settings = f"{batch_size}:{max_new_tokens}:"
        hashes = [hashlib.sha1((settings + p).encode()).hexdigest()[:16] for p in prompts]
        path = Path(out).with_name(Path(out).name + ".partial")
        try:
            store = RationaleStore(path, fsync=False)
        except DataError as err:  # not ours (or from an older kpod): start over rather than fail
            warnings.warn(f"{err}; starting the evaluation over", stacklevel=2)
            path.unlink()
            store = RationaleStore(path, fsync=False)
        recorded = {record_key(r): r["generated"] for r in store}
        keys = [(e.qid, resume_key, h, 0) for e, h in zip(questions, hashes, strict=True)]
        done = {i: recorded[k] for i, k in enumerate(keys) if k in recorded}

    def record(indices: list[int], texts: list[str]) -> None:
        for i, text in zip(indices, texts, strict=True):
            row = {"qid": questions[i].qid, "teacher": resume_key, "prompt_hash": hashes[i], "sample": 0}
            store.append({**row, "generated": text})

    start = time.perf_counter()
    try:
        with generation_model(model, precision, batch_size) as (gen_model, precision):
            texts = generate(
                gen_model,
                tokenizer,
                prompts,
                kind=kind,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                add_special_tokens=fmt.style == "paper",
                progress=progress,
                done=done,
                on_batch=record if store is not None else None,
                compact=compact,
            )
    finally:
        if store is not None:
            store.close()
    seconds = time.perf_counter() - start
    predictions = []
    n_tokens = 0
    for e, text in zip(questions, texts, strict=True):
        found = extract_answer_detail(text, e.answer_kind, e.choices)
        correct = answers_match(found.answer, e.answer, e.answer_kind)
        n_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        predictions.append(
            {
                "qid": e.qid,
                "question": e.question,
                "gold": e.answer,
                "generated": text,
                "predicted": found.answer,
                "rule": found.rule,
                "correct": correct,
            }
        )
    n_correct = sum(p["correct"] for p in predictions)
    result = EvalResult(
        n=len(questions),
        correct=n_correct,
        accuracy=n_correct / len(questions) if questions else 0.0,
        ci95=wilson_interval(n_correct, len(questions)),
        seconds=seconds,
        generated_tokens=n_tokens,
        predictions=predictions,
        precision=precision,
    )
    if out is not None:
        write_jsonl(out, predictions)
    if store is not None:
        store.path.unlink(missing_ok=True)
    return result


def weights_fingerprint(model: Any) -> str:
    """A short fingerprint of a model's trainable weights (all weights when none is trainable): the
    sum and absolute sum of each tensor, hashed. Cheap on any device and size; two differently
    trained states collide only if every tensor's two sums agree to float64 rounding."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = params or list(model.named_parameters())
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, p in params:
            q = p.detach().double()
            digest.update(f"{name}:{float(q.sum())!r}:{float(q.abs().sum())!r};".encode())
    return digest.hexdigest()[:16]
