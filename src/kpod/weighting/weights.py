"""The token-weights file: what `kpod weights train` writes and every reader of weights reads.

``weights.jsonl`` holds one :class:`TokenWeights` a line: a rationale's key, its question id, and the
weight of each of its tokens with the token's character offsets in the rationale. The offsets make
the file independent of any tokenizer: :func:`rendered_token_weights` re-slices the weights onto the
tokens of a rendered prompt (another tokenizer, another template) by character overlap.

Readers (difficulty scoring, the distillation loss, heat-maps, metrics) import this module, not the
mask-learning trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpod.data.schema import Example
from kpod.io import write_jsonl
from kpod.weighting.maths import align_weights, rescale_weights

WEIGHTS_FILE = "weights.jsonl"


def rationale_key(example: Example) -> str:
    """Identifies one rationale of one question (several rationales share a qid)."""
    return hashlib.sha256(f"{example.qid}\x00{example.rationale}".encode()).hexdigest()[:16]


@dataclass
class TokenWeights:
    """The learned weight of each token of one rationale.

    ``offsets[i]`` is token i's ``(start, end)`` character span in the rationale, ``weights[i]`` its
    weight (the mask generator's kept probability, Eq. 3)."""

    key: str
    qid: str
    offsets: list[tuple[int, int]]
    weights: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "qid": self.qid,
            "key": self.key,
            "offsets": [list(o) for o in self.offsets],
            "weights": list(self.weights),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> TokenWeights:
        return cls(
            key=str(row["key"]),
            qid=str(row["qid"]),
            offsets=[(int(s), int(e)) for s, e in row["offsets"]],
            weights=[float(w) for w in row["weights"]],
        )


def save_weights(path: str | os.PathLike[str], rows: Iterable[TokenWeights]) -> None:
    """Write ``rows`` as ``weights.jsonl`` (a file path, or a directory to hold it), atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / WEIGHTS_FILE
    write_jsonl(path, [r.to_dict() for r in rows])


def load_weights(
    path: str | os.PathLike[str], rescale: str = "none", floor: float = 0.1
) -> dict[str, TokenWeights]:
    """``weights.jsonl`` (a file, or the directory holding it) by rationale key, each row's weights
    rescaled per rationale (:func:`kpod.weighting.maths.rescale_weights`; ``none``: as trained)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    with open(path, encoding="utf-8") as f:
        rows = {row.key: row for row in (TokenWeights.from_dict(json.loads(line)) for line in f)}
    if rescale != "none":
        for row in rows.values():
            row.weights = rescale_weights(row.weights, rescale, floor)
    return rows


def rendered_token_weights(example: Example, tokens: Any, row: TokenWeights | None) -> list[float]:
    """The learned weight of every token of a rendered, tokenized example (a
    :class:`kpod.prompt.TokenizedExample`), re-sliced from ``row`` (whose offsets are in the
    rationale) by character offsets; 1 outside the rationale or without ``row``."""
    if row is None:
        return [1.0] * len(tokens.input_ids)
    shift = tokens.rendered.steps[0].start - example.steps[0].start
    offsets = [(s - shift, e - shift) for s, e in tokens.offsets]
    return align_weights(row.offsets, row.weights, offsets, default=1.0)
