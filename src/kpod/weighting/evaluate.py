"""Measuring what token weighting learned.

* Synthetic data (ground-truth keypoints): ROC-AUC of ``w`` for telling keypoint tokens
  (quantities, operators, results) from the rest, and the mean weight of each class.
* Any data (e.g. GSM8K): the mean weight of digit and operator tokens against that of the 50 most
  frequent word tokens, which are overwhelmingly function words.

Both report ``contrast``: the mean weight of the keypoint (digit/operator) tokens minus that of the
other (frequent-word) tokens, i.e. how much more a keypoint counts in the student's loss. AUC says
whether the ranking is right, contrast whether it matters.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kpod.data.schema import Example
from kpod.weighting.weights import rationale_key

_DIGIT_OR_OPERATOR = re.compile(r"^[\d.,]*\d[\d.,]*$|^[-+*/=x×÷%$]$")
_WORD = re.compile(r"^[A-Za-z]+$")


def _token_text(example: Example, offset: list[int]) -> str:
    return example.rationale[offset[0] : offset[1]].strip()


def keypoint_labels(example: Example, offsets: Sequence[Sequence[int]]) -> list[int | None]:
    """1 if a token overlaps a keypoint span, 0 if not, ``None`` for whitespace-only tokens."""
    labels: list[int | None] = []
    for start, end in offsets:
        text = example.rationale[start:end]
        if not text.strip():
            labels.append(None)
            continue
        s = start + (len(text) - len(text.lstrip()))
        e = end - (len(text) - len(text.rstrip()))
        labels.append(int(any(k.start < e and s < k.end for k in example.keypoints)))
    return labels


def weight_range(rows: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest weight over every row (for legends)."""
    values = [w for row in rows.values() for w in row.weights]
    return (min(values), max(values)) if values else (0.0, 1.0)


def keypoint_metrics(examples: Sequence[Example], rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """ROC-AUC of the weights against ground-truth keypoints, and the class means."""
    from sklearn.metrics import roc_auc_score

    ys: list[int] = []
    ws: list[float] = []
    all_w: list[float] = []
    for e in examples:
        row = rows.get(rationale_key(e))
        if row is None or not e.keypoints:
            continue
        all_w += row.weights
        for label, w in zip(keypoint_labels(e, row.offsets), row.weights, strict=True):
            if label is not None:
                ys.append(label)
                ws.append(w)
    if len(set(ys)) < 2:
        raise ValueError("keypoint metrics need examples with both keypoint and other tokens")
    key = [w for y, w in zip(ys, ws, strict=True) if y == 1]
    other = [w for y, w in zip(ys, ws, strict=True) if y == 0]
    return {
        "auc": round(float(roc_auc_score(ys, ws)), 4),
        "contrast": round(statistics.fmean(key) - statistics.fmean(other), 4),
        "mean_w_keypoint": round(statistics.fmean(key), 4),
        "mean_w_other": round(statistics.fmean(other), 4),
        "kept_ratio": round(statistics.fmean(all_w), 4),
        "n_tokens": len(ys),
        "n_keypoint_tokens": len(key),
    }


def token_class_metrics(examples: Sequence[Example], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean weight of digit/operator tokens vs the 50 most frequent word tokens."""
    numeric: list[float] = []
    by_word: dict[str, list[float]] = {}
    all_w: list[float] = []
    for e in examples:
        row = rows.get(rationale_key(e))
        if row is None:
            continue
        all_w += row.weights
        for offset, w in zip(row.offsets, row.weights, strict=True):
            text = _token_text(e, offset)
            if _DIGIT_OR_OPERATOR.match(text):
                numeric.append(w)
            elif _WORD.match(text):
                by_word.setdefault(text.lower(), []).append(w)
    frequent = [word for word, _ in Counter({k: len(v) for k, v in by_word.items()}).most_common(50)]
    frequent_w = [w for word in frequent for w in by_word[word]]
    contrast = None
    if numeric and frequent_w:
        contrast = round(statistics.fmean(numeric) - statistics.fmean(frequent_w), 4)
    return {
        "contrast": contrast,
        "mean_w_digit_operator": round(statistics.fmean(numeric), 4) if numeric else None,
        "mean_w_frequent_words": round(statistics.fmean(frequent_w), 4) if frequent_w else None,
        "kept_ratio": round(statistics.fmean(all_w), 4) if all_w else None,
        "n_digit_operator_tokens": len(numeric),
        "frequent_words": frequent[:10],
    }
