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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kpod.data.schema import Example
from kpod.errors import ModelError
from kpod.progressive.maths import step_difficulty
from kpod.prompt import PromptFormat, render_example, tokenize_rendered
from kpod.weighting.maths import align_weights
from kpod.weighting.train import rationale_key


def _read_cache(path: Path) -> dict[str, list[float]]:
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


def step_weights_for(example: Example, tokenized: Any, row: dict[str, Any] | None) -> list[float]:
    """The weight of every token of a rendered example (1 outside the rationale or without weights)."""
    if row is None:
        return [1.0] * len(tokenized.input_ids)
    shift = tokenized.rendered.steps[0].start - example.steps[0].start
    offsets = [(s - shift, e - shift) for s, e in tokenized.offsets]
    return align_weights([tuple(o) for o in row["offsets"]], row["weights"], offsets, default=1.0)


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
) -> dict[str, list[float]]:
    """Per-step difficulties of every rationale, by rationale key (Eq. 8).

    ``student`` is a :class:`kpod.models.LoadedModel` of the *pretrained* student; ``weights`` the
    rows of ``weights.jsonl`` by key, or ``None`` for uniform weights.
    """
    fmt = fmt or PromptFormat()
    if student.kind != "causal":
        raise ModelError("step difficulty scoring supports causal students so far (seq2seq: issue #5)")
    done = _read_cache(cache) if cache is not None else {}
    todo = [e for e in examples if e.steps and rationale_key(e) not in done]
    model, tok = student.model, student.tokenizer
    model.eval()
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch, and memory problems show up at once.
    tokenized = sorted(
        ((e, tokenize_rendered(render_example(e, fmt, tok), tok, fmt)) for e in todo),
        key=lambda pair: -len(pair[1].input_ids),
    )
    handle = open(cache, "a", encoding="utf-8") if cache is not None else None
    try:
        for start in tqdm(range(0, len(tokenized), batch_size), desc="step difficulty", disable=not progress):
            batch = tokenized[start : start + batch_size]
            longest = max(len(t.input_ids) for _, t in batch)
            ids = torch.full((len(batch), longest), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (_, t) in enumerate(batch):
                ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
                mask[i, : len(t.input_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = (
                torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            )
            lines = []
            for i, (example, t) in enumerate(batch):
                token_logp = [0.0] + logp[i, : len(t.input_ids) - 1].cpu().tolist()
                w = step_weights_for(
                    example, t, None if weights is None else weights.get(rationale_key(example))
                )
                diffs = []
                for k in range(len(example.steps)):
                    positions = [p for p, seg in enumerate(t.segments) if seg == k and p > 0]
                    diffs.append(
                        step_difficulty(
                            [token_logp[p] for p in positions],
                            None if weights is None else [w[p] for p in positions],
                        )
                    )
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


@torch.no_grad()
def question_embeddings(questions: Sequence[str], student: Any) -> np.ndarray:
    """Mean of the student's input embeddings over each question's tokens."""
    emb = student.model.get_input_embeddings()
    out = []
    for q in questions:
        ids = student.tokenizer(q, add_special_tokens=False)["input_ids"] or [0]
        out.append(emb(torch.tensor(ids, device=emb.weight.device)).float().mean(0).cpu().numpy())
    return np.stack(out)


def cluster_questions(embeddings: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """K-means cluster of every row (K is capped at the number of rows)."""
    from sklearn.cluster import KMeans

    k = max(1, min(n_clusters, len(embeddings)))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embeddings)
