"""Scoring step difficulty with the un-distilled student (Eq. 8), and clustering questions.

Difficulty: every rationale is rendered with the shared prompt format and scored under teacher
forcing by the pretrained student (no LoRA); the log-probabilities of each step's tokens are
combined with the token weights, softmax-normalised within the step (Eq. 8), or uniformly for the
"w/o sig-dif" ablation. Token weights come from ``weights.jsonl`` (rationale character offsets)
and are re-sliced onto the rendered sequence's tokens by offsets. Results are appended to a cache
file per batch, so an interrupted run resumes where it stopped.

The schedule unit is one rationale (the paper has one per question); its cluster is its question's.

Clusters: K-means over question embeddings. The paper uses mean GloVe vectors; our default is the
mean of the student's own input embeddings over the question's tokens (offline, no download).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kpod.batching import pad_ids
from kpod.chunked_loss import bypassed_head, head_bypass_supported, kept_logit_buffers, linear_token_logprobs
from kpod.data.schema import Example
from kpod.models import autocast, frozen_linears_for, gqa_attention_on_cpu, norm_casts_shared
from kpod.precision import compute_precision
from kpod.progressive.maths import step_difficulty
from kpod.prompt import PromptFormat, render_example, tokenize_rendered, tokenize_split
from kpod.weighting.weights import rationale_key, rendered_token_weights


def read_difficulties(path: Path) -> dict[str, list[float]]:
    """The per-step difficulties a scoring run wrote to ``path`` (``difficulty.jsonl``), by
    rationale key; a last line cut short by a crash is skipped."""
    out: dict[str, list[float]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: that rationale is scored again
        out[row["key"]] = row["difficulty"]
    return out


@torch.no_grad()
def score_difficulties(
    examples: Sequence[Example],
    student: Any,
    weights: dict[str, dict[str, Any]] | None,
    *,
    fmt: PromptFormat | None = None,
    batch_size: int = 8,
    cache: Path | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, list[float]]:
    """Per-step difficulties of every rationale, by rationale key (Eq. 8).

    ``student`` is a :class:`kpod.models.LoadedModel` of the *pretrained* student; ``weights`` the
    rows of ``weights.jsonl`` by key, or ``None`` for uniform weights. ``precision``: ``fp32``, or
    ``bf16`` autocast with the frozen student's weights held in bf16 while it scores (the
    log-probabilities in float32 either way), or ``auto`` (bf16 where its products are fast:
    :func:`kpod.precision.compute_precision`); `kpod run` scores in ``difficulty.precision``.
    """
    fmt = fmt or PromptFormat()
    done = read_difficulties(cache) if cache is not None else {}
    todo = [e for e in examples if e.steps and rationale_key(e) not in done]
    model, tok = student.model, student.tokenizer
    model.eval()
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch, and memory problems show up at once.
    tokenized = sorted(
        (_tokenize(e, fmt, tok, student.kind) for e in todo), key=lambda item: -len(item[1].input_ids)
    )
    first_scored = 1 if student.kind == "causal" else 0  # a causal LM does not predict its first token
    handle = open(cache, "a", encoding="utf-8") if cache is not None else None
    try:
        precision = compute_precision(precision, device.type)
        with _scoring_precision(model, device.type, precision), kept_logit_buffers():
            for start in tqdm(
                range(0, len(tokenized), batch_size), desc="step difficulty", disable=not progress
            ):
                batch = tokenized[start : start + batch_size]
                steps_of = [_step_positions(example, t, first_scored) for example, t, _ in batch]
                wanted = [[p for positions in steps for p in positions] for steps in steps_of]
                all_logp = _token_logprobs(batch, model, tok, student.kind, device, wanted)
                lines = []
                for (example, t, _), token_logp, by_step in zip(batch, all_logp, steps_of, strict=True):
                    w = rendered_token_weights(
                        example, t, None if weights is None else weights.get(rationale_key(example))
                    )
                    diffs = [
                        step_difficulty(
                            [token_logp[p] for p in positions],
                            None if weights is None else [w[p] for p in positions],
                        )
                        for positions in by_step
                    ]
                    key = rationale_key(example)
                    done[key] = diffs
                    lines.append(json.dumps({"key": key, "qid": example.qid, "difficulty": diffs}) + "\n")
                if handle is not None:
                    handle.write("".join(lines))
                    handle.flush()
    finally:
        if handle is not None:
            handle.close()
    return done


@contextlib.contextmanager
def _scoring_precision(model: Any, device_type: str, precision: str) -> Iterator[None]:
    """``fp32``: as loaded. Otherwise autocast, with the frozen student's linear weights held in
    bf16 where :func:`kpod.models.frozen_linears_for` says (no cast at every forward), and its
    norms' outputs cast to bf16 once, not once per projection (:func:`kpod.models.norm_casts_shared`;
    the same numbers). In either precision the attention reads grouped key/value heads in place
    (:func:`kpod.models.gqa_attention_on_cpu`; the same numbers)."""
    with (
        frozen_linears_for(model, precision, device_type),
        norm_casts_shared(model, torch.bfloat16),
        gqa_attention_on_cpu(),
        autocast(device_type, precision),
    ):
        yield


def _tokenize(example: Example, fmt: PromptFormat, tok: Any, kind: str) -> tuple[Example, Any, list[int]]:
    """(example, tokens scored with their pieces, encoder ids): causal students score the whole
    rendered sequence; seq2seq students read the prompt in the encoder and score the rest."""
    rendered = render_example(example, fmt, tok)
    if kind == "causal":
        return example, tokenize_rendered(rendered, tok, fmt), []
    encoder_ids, target = tokenize_split(rendered, tok, rendered.prompt.end)
    return example, target, encoder_ids


def _step_positions(example: Example, t: Any, first_scored: int) -> list[list[int]]:
    """The positions of each step's tokens in the scored sequence ``t`` (a causal LM's first
    token is not predicted, so not scored)."""
    by_step: list[list[int]] = [[] for _ in example.steps]
    for p, seg in enumerate(t.segments):
        if 0 <= seg < len(by_step) and p >= first_scored:
            by_step[seg].append(p)
    return by_step


def _token_logprobs(
    batch: list, model: Any, tok: Any, kind: str, device: Any, wanted: list[list[int]] | None = None
) -> list[list[float]]:
    """log P of every scored token under teacher forcing, aligned with each target's tokens.

    With ``wanted`` (positions per row) a causal student whose output projection can be bypassed
    projects only those positions onto the vocabulary (the others read 0): step difficulty needs
    the steps' tokens, not the question's, and the projection with its softmax over the vocabulary
    is a large part of a scored token's cost (scoring 1.15x faster: BENCHMARKS.md, "Issue #21,
    session 30")."""
    pad = tok.pad_token_id or 0
    targets, mask = pad_ids([t.input_ids for _, t, _ in batch], pad)
    targets, mask = targets.to(device), mask.to(device)
    if kind == "causal" and head_bypass_supported(model):
        # Only the wanted tokens' log-probabilities, the projection applied in chunks (no full logits).
        with bypassed_head(model) as projection:
            hidden = model(input_ids=targets, attention_mask=mask, use_cache=False).logits
        if wanted is None:
            scored = mask.bool()
        else:
            scored = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
            for i, positions in enumerate(wanted):
                scored[i, positions] = True
        scored[:, 0] = False  # position 0 is not predicted
        logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        logp[scored] = linear_token_logprobs(hidden[:, :-1][scored[:, 1:]], projection, targets[scored])
    elif kind == "causal":
        logits = model(input_ids=targets, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets[:, 1:, None]).squeeze(-1)
        logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)  # position 0 is not predicted
    else:
        enc, enc_mask = pad_ids([e for _, _, e in batch], pad)
        labels = targets.masked_fill(mask == 0, -100)
        logits = model(
            input_ids=enc.to(device), attention_mask=enc_mask.to(device), labels=labels
        ).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, :, None]).squeeze(-1)
    return [logp[i, : len(t.input_ids)].cpu().tolist() for i, (_, t, _) in enumerate(batch)]


@torch.no_grad()
def question_embeddings(questions: Sequence[str], student: Any, encoder: str | None = None) -> np.ndarray:
    """One vector per question, for K-means.

    Default: the mean of the student's input embeddings over the question's tokens (the paper's
    mean-GloVe idea with the student's own vocabulary; offline). ``encoder`` names any Hugging Face
    encoder (e.g. a sentence-embedding model): its last hidden states are mean-pooled instead.
    """
    if encoder is not None:
        from transformers import AutoModel

        from kpod.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(encoder)
        model = AutoModel.from_pretrained(path).eval()
        tokenizer = load_tokenizer(path)
        out = []
        for start in range(0, len(questions), 32):
            enc = tokenizer(
                list(questions[start : start + 32]), padding=True, truncation=True, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
        return np.concatenate(out)
    emb = student.model.get_input_embeddings()
    vectors = []
    for q in questions:
        ids = student.tokenizer(q, add_special_tokens=False)["input_ids"] or [0]
        vectors.append(emb(torch.tensor(ids, device=emb.weight.device)).float().mean(0).cpu().numpy())
    return np.stack(vectors)


def cluster_questions(embeddings: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """K-means cluster of every row (K is capped at the number of rows)."""
    from sklearn.cluster import KMeans

    k = max(1, min(n_clusters, len(embeddings)))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embeddings)
