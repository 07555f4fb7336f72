"""Evaluation by answer accuracy: batched greedy generation and the data layer's answer extractor.

Generation: prompts rendered by the shared prompt module (question only: the student writes the
whole rationale), sorted by length so batches carry little padding, left-padded for decoder-only
models, greedy with the KV cache, and stopped per sequence once the answer phrase is complete
(end-of-sequence, or a newline or sentence end after "Therefore, the answer is ..."). Accuracy
comes with a 95 % Wilson score interval, and every prediction is written to JSONL.
"""

from __future__ import annotations

import hashlib
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
from kpod.errors import ConfigError, DataError
from kpod.io import write_jsonl
from kpod.lock import holds_lock
from kpod.models import cache_keyword, gqa_attention_on_cpu, last_positions
from kpod.prompt import PromptFormat, render_prompt
from kpod.stats import wilson_interval

# Part of every resume key: generations recorded by another decoding path (another version of this
# module's loop, adapters merged or not) are not mixed with this one's. 2: the compacting loop and
# bf16 copies with merged adapters (session 12). 3: the compacting loop refills its batch (session 13).
# 4: finished rows leave the batch in groups (DROP_FINISHED_SHARE; session 15).
GENERATION_VERSION = 4

# The compacting loop decodes chunks of this many batches' worth of prompts, refilling its batch
# from the chunk as sequences end; a chunk is also the unit an interrupted evaluation resumes by.
REFILL_BATCHES = 4

# The compacting loop drops finished rows from its batch once they are this share of it (and before
# a refill). Each drop copies every layer's KV cache, so dropping each row as it ends copied the
# cache at nearly every step (about a fifth of a batch-128 evaluation's time here); a finished row
# left in the batch costs only its share of the step's work, and its output is ignored.
DROP_FINISHED_SHARE = 0.25

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


def _answers_complete(tokenizer: Any, generated: torch.Tensor | list[list[int]]) -> list[bool]:
    """Per row of generated token ids (a tensor or lists): whether its last :data:`STOP_WINDOW`
    tokens finish the answer phrase (one batched decode; the stop rule of both generation paths)."""
    if isinstance(generated, torch.Tensor):
        windows = generated[:, -STOP_WINDOW:]
    else:
        windows = [row[-STOP_WINDOW:] for row in generated]
    texts = tokenizer.batch_decode(windows, skip_special_tokens=True)
    return [answer_complete(t) for t in texts]


class _StopOnAnswer:
    """A transformers stopping criterion: per sequence, stop once its answer phrase is complete."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        complete = _answers_complete(self.tokenizer, input_ids[:, self.prompt_length :])
        return torch.tensor(complete, dtype=torch.bool, device=input_ids.device)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with ``width`` zeros put before it along ``dim``."""
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _greedy_compacting(
    model: Any,
    enc: Any,
    tokenizer: Any | None,
    max_new_tokens: int,
    eos: set[int],
    batch_size: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of the rows of a left-padded causal batch ``enc``, each row's tokens up
    to and including the one that ends it (end-of-sequence, or its answer phrase complete; with
    ``tokenizer`` None no answer check: the end-of-sequence ids ``eos`` and ``max_new_tokens`` only).

    At most ``batch_size`` rows (default: all) decode together. A row that ends is finished: its
    tokens stop being recorded, and the finished rows leave the batch together (their KV cache, mask
    and position dropped) once they are :data:`DROP_FINISHED_SHARE` of it; when half the batch or
    less is still live, the finished rows leave and the next
    rows of ``enc`` (in order) are prefilled together and joined to it, the shorter of the two
    caches padded on the left. ``model.generate`` instead carries finished rows to the end of the
    batch's longest: decoding a small model on a CPU streams all its weights from memory once per
    step, so a step of 128 rows costs much less than four steps of 32, and a batch that empties
    wastes that (the measured effect is in BENCHMARKS.md). Same model calls as greedy
    ``generate`` otherwise: a prefill with positions from the mask, then one token per step; the
    result depends on ``batch_size`` and the order of the rows only through rounding (bf16 rounds
    differently in a differently shaped batch). The KV cache grows in place
    (:mod:`kpod.kv_cache`), where transformers' copies itself at every step.
    """
    from kpod.kv_cache import growing_cache, join

    ids_all, mask_all = enc["input_ids"], enc["attention_mask"]
    total = ids_all.shape[0]
    batch_size = batch_size or total
    key = cache_keyword(model)
    tokens: list[list[int]] = [[] for _ in range(total)]
    queued = 0  # rows of ``enc`` not yet admitted
    rows: list[int] = []  # the row of ``enc`` of each live sequence
    cache = mask = last = nxt = None

    def survivors(
        rows: list[int | None], nxt: torch.Tensor, cache: Any, *tensors: torch.Tensor, share: float
    ) -> tuple[list[int | None], tuple[torch.Tensor, ...]]:
        """Record each live row's new token ``nxt``; a row that ends is marked finished (``None``);
        then :func:`dropped` with ``share``."""
        rows = list(rows)
        live = [i for i, row in enumerate(rows) if row is not None]
        for i, t in zip(live, nxt[live].tolist(), strict=True):
            tokens[rows[i]].append(t)
        if tokenizer is None:
            complete = [False] * len(live)
        else:
            complete = _answers_complete(tokenizer, [tokens[rows[i]] for i in live])
        for i, done in zip(live, complete, strict=True):
            row = rows[i]
            if done or tokens[row][-1] in eos or len(tokens[row]) >= max_new_tokens:
                rows[i] = None
        return dropped(rows, cache, *tensors, share=share)

    def dropped(
        rows: list[int | None], cache: Any, *tensors: torch.Tensor, share: float = 0.0
    ) -> tuple[list[int | None], tuple[torch.Tensor, ...]]:
        """The finished rows dropped from ``rows``, ``cache`` and each of ``tensors`` (indexed by
        batch row) if they are at least ``share`` of the batch (0: if there is one)."""
        finished = rows.count(None)
        if finished and finished >= share * len(rows):
            keep = [i for i, row in enumerate(rows) if row is not None]
            index = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device)
            cache.batch_select_indices(index)
            tensors = tuple(t[index] for t in tensors)
            rows = [rows[i] for i in keep]
        return rows, tensors

    def n_live(rows: list[int | None]) -> int:
        return len(rows) - rows.count(None)

    while True:
        while queued < total and n_live(rows) <= batch_size // 2:
            if rows:  # the finished rows leave first: the refill takes their places
                rows, (mask, last, nxt) = dropped(rows, cache, mask, last, nxt)
            group = list(range(queued, min(total, queued + batch_size - len(rows))))
            queued = group[-1] + 1
            g_mask = mask_all[group]
            start = int(g_mask.any(0).nonzero()[0])  # columns that are padding in every row
            g_ids, g_mask = ids_all[group, start:], g_mask[:, start:]
            positions = (g_mask.cumsum(-1) - 1).clamp(min=0)
            g_cache = growing_cache(model)
            out = model(
                input_ids=g_ids,
                attention_mask=g_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=last_positions(g_ids.shape[1], 1, g_ids.device),
                **{key: g_cache},
            )
            g_nxt = out.logits[:, -1, :].argmax(-1)
            # share 0: no finished row joins the batch
            group, (g_mask, positions, g_nxt) = survivors(
                group, g_nxt, g_cache, g_mask, positions, g_nxt, share=0.0
            )
            if not group:
                continue
            if not rows:
                cache, mask, last, nxt, rows = g_cache, g_mask, positions[:, -1], g_nxt, group
                continue
            # Join the two batches: drop the live one's all-padding columns, pad the shorter on the left.
            start = int(mask.any(0).nonzero()[0])
            width = max(mask.shape[1] - start, g_mask.shape[1])
            live_pad, new_pad = width - (mask.shape[1] - start), width - g_mask.shape[1]
            join(cache, g_cache, start, live_pad, new_pad)
            mask = torch.cat([_pad_left(mask[:, start:], live_pad, 1), _pad_left(g_mask, new_pad, 1)], 0)
            last, nxt, rows = torch.cat([last, positions[:, -1]]), torch.cat([nxt, g_nxt]), rows + group
        if not n_live(rows):
            return tokens
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        last = last + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            use_cache=True,
            **{key: cache},
        )
        nxt = out.logits[:, -1, :].argmax(-1)
        rows, (mask, last, nxt) = survivors(rows, nxt, cache, mask, last, nxt, share=DROP_FINISHED_SHARE)


def _generate_batch(
    model: Any,
    tokenizer: Any,
    enc: Any,
    kind: str,
    max_new_tokens: int,
    compact: bool,
    batch_size: int | None = None,
) -> list[str]:
    """One tokenised chunk's greedy continuations, decoded (``batch_size`` rows at a time where
    the compacting loop refills its batch, else the chunk is one batch)."""
    from transformers import StoppingCriteriaList

    if compact and kind == "causal":
        eos = model.generation_config.eos_token_id  # what model.generate stops on
        eos = tokenizer.eos_token_id if eos is None else eos
        eos = set(eos) if isinstance(eos, list) else {eos}
        new = _greedy_compacting(model, enc, tokenizer, max_new_tokens, eos, batch_size)
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
@gqa_attention_on_cpu()  # prefills read grouped key/value heads in place (the same numbers)
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

    ``compact`` (causal models): finished sequences leave the batch as they end and the batch is
    refilled from the next prompts (:func:`_greedy_compacting`), over chunks of
    :data:`REFILL_BATCHES` batches' worth of prompts, instead of each batch being carried to the
    end of its longest sequence by ``model.generate``.

    ``done`` maps prompt indices to continuations already generated (by an earlier, interrupted
    call with the same prompts and settings): a chunk (a batch, where not compacting) whose prompts
    are all there is not generated again, so the remaining chunks are exactly those of an
    uninterrupted call (the company of a prompt in its batch can change bf16 results, so a partly
    done chunk is generated whole). ``on_batch(indices, texts)`` is called after each generated
    chunk (to record progress).
    """
    done = done or {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if kind == "causal" else "right"
    device = next(model.parameters()).device
    chunk = batch_size * REFILL_BATCHES if compact and kind == "causal" else batch_size
    bar = tqdm(total=len(order), desc="generate", disable=not progress)
    try:
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            if all(i in done for i in idx):
                for i in idx:
                    out[i] = done[i]
                bar.update(len(idx))
                continue
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            texts = _generate_batch(model, tokenizer, enc, kind, max_new_tokens, compact, batch_size)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
            if on_batch is not None:
                on_batch(idx, texts)
            bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
        bar.close()
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
    batch_size: int | None = None

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
            "batch_size": self.batch_size,
        }


def _auto_batch(
    model: Any, tokenizer: Any, prompts: list[str], fmt: PromptFormat, max_new_tokens: int, precision: str
) -> tuple[int, str]:
    """``batch_size: auto`` for ``prompts`` (:func:`kpod.kv_cache.auto_batch_size`) and the
    precision with ``auto`` resolved at that batch size."""
    from kpod.kv_cache import auto_batch_size
    from kpod.precision import resolve

    lengths = tokenizer(prompts, add_special_tokens=fmt.style == "paper")["input_ids"] if prompts else []
    positions = max((len(ids) for ids in lengths), default=0) + max_new_tokens
    stored = 2 if next(model.parameters()).dtype == torch.bfloat16 else 4
    batch = auto_batch_size(model, positions, 2 if precision == "bf16" else stored)
    if precision == "auto":
        precision = resolve(precision, model, batch)
        if precision == "bf16" and stored == 4:  # a bf16 copy generates: half the bytes a row
            batch = auto_batch_size(model, positions, 2)
    return batch, precision


@holds_lock("out", directory=False)
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    kind: str = "causal",
    fmt: PromptFormat | None = None,
    batch_size: int | str = "auto",
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

    ``batch_size``: rows generated together, or ``auto``: as many as
    :func:`kpod.kv_cache.auto_batch_size` allows for the longest prompt plus ``max_new_tokens``
    (counted in fp32 for choosing ``auto`` precision, then again in bf16 if bf16 is chosen); the
    one used is in the result.
    """
    from kpod.precision import generation_model, resolve

    fmt = fmt or PromptFormat()
    questions = list({e.qid: e for e in examples}.values())
    prompts = [render_prompt(question_prefix + e.question, fmt, tokenizer) for e in questions]
    if batch_size == "auto":
        batch_size, precision = _auto_batch(model, tokenizer, prompts, fmt, max_new_tokens, precision)
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    precision = resolve(precision, model, batch_size)
    if resume_key is not None:
        resume_key = f"{resume_key}:{precision}:{GENERATION_VERSION}"
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
        batch_size=batch_size,
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
