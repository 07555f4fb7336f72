"""Splits by question (never by rationale), and the paper's splits by name (paper Table 4).

=============  ======  ====  ====  ====================================================
data set       train   dev   test  how kpod makes it
=============  ======  ====  ====  ====================================================
GSM8K          7473    660   659   official train; official test cut by the indices in
                                   ``paper_split.json`` (MCC-KD's split)
ASDiv          1462    313   314   teacher-rationale release's train/test; dev carved from
                                   train by question (seeded, :func:`carve_dev`)
SVAMP          700     150   150   seeded split by question of the 1000 problems
CommonsenseQA  8520    1221  1221  official dev as test; dev carved from official train
=============  ======  ====  ====  ====================================================

The GSM8K indices are not derivable from the data, so ``paper_split.json`` (0-based line
indices of ``test.jsonl`` under the keys ``dev`` and ``test``) is read from beside the data file
or from an explicit path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from kpod.data.schema import Example
from kpod.errors import DataError

PAPER_SIZES: dict[str, dict[str, int]] = {
    "gsm8k": {"train": 7473, "dev": 660, "test": 659},
    "asdiv": {"train": 1462, "dev": 313, "test": 314},
    "svamp": {"train": 700, "dev": 150, "test": 150},
    "csqa": {"train": 8520, "dev": 1221, "test": 1221},
}


def question_ids(examples: Sequence[Example]) -> list[str]:
    """Distinct qids in order of first appearance."""
    return list(dict.fromkeys(e.qid for e in examples))


def _rank(qid: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()


def split_by_question(
    examples: Sequence[Example], sizes: dict[str, int | float], seed: int = 0
) -> dict[str, list[Example]]:
    """Split examples into named parts by question, so no question is in two parts.

    ``sizes`` maps part names to a number of questions (int) or a fraction of them (float); at
    most one part may be ``-1`` meaning "the rest". The order of questions is a seeded hash of the
    qid, so a question's part does not depend on which other questions are in the file.
    """
    qids = sorted(question_ids(examples), key=lambda q: _rank(q, seed))
    n = len(qids)
    counts: dict[str, int] = {}
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError("at most one part may take the rest (-1)")
    for name, size in sizes.items():
        if size == -1:
            continue
        counts[name] = round(size * n) if isinstance(size, float) else int(size)
    if sum(counts.values()) > n:
        raise DataError(
            f"split sizes {dict(sizes)} need {sum(counts.values())} questions; only {n} available"
        )
    if rest:
        counts[rest[0]] = n - sum(counts.values())
    parts: dict[str, set[str]] = {}
    start = 0
    for name in sizes:
        parts[name] = set(qids[start : start + counts[name]])
        start += counts[name]
    return {name: [e for e in examples if e.qid in ids] for name, ids in parts.items()}


def carve_dev(examples: Sequence[Example], n_dev: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, dev): ``n_dev`` questions of a training file held out, with all their rationales."""
    parts = split_by_question(examples, {"dev": n_dev, "train": -1}, seed)
    return parts["train"], parts["dev"]


def gsm8k_paper_split(
    test_examples: Sequence[Example], part: str, split_file: str | Path | None = None
) -> list[Example]:
    """The paper's GSM8K ``dev`` (660) or ``test`` (659) part of the official test set.

    ``test_examples`` are the official test set as loaded from ``test.jsonl`` (or the hub):
    their ``provenance["index"]`` is the 0-based record index the split file refers to. The
    split file defaults to ``paper_split.json`` beside the loaded file.
    """
    if part not in ("dev", "test"):
        raise DataError(f"GSM8K paper split part must be 'dev' or 'test', got '{part}'")
    if split_file is None:
        files = {e.provenance.get("file") for e in test_examples}
        candidates = [
            Path(f).parent / "paper_split.json" for f in files if f and not str(f).startswith("hub:")
        ]
        if not candidates:
            raise DataError("no paper_split.json location known; pass the split file explicitly")
        split_file = candidates[0]
    split_file = Path(split_file)
    if not split_file.is_file():
        raise DataError(
            f"the GSM8K paper split needs {split_file} (0-based indices of test.jsonl under 'dev' and 'test')"
        )
    try:
        indices = json.loads(split_file.read_text(encoding="utf-8"))[part]
    except (json.JSONDecodeError, KeyError) as err:
        raise DataError(f"no '{part}' list of indices in the split file", source=str(split_file)) from err
    wanted = set(indices)
    chosen = [e for e in test_examples if e.provenance.get("index") in wanted]
    if len({e.provenance["index"] for e in chosen}) != len(wanted):
        raise DataError(
            f"the split file lists {len(wanted)} indices but only {len(chosen)} match the loaded examples: "
            "is this the official GSM8K test set?",
            source=str(split_file),
        )
    return chosen


def rationale_is_correct(example: Example) -> bool:
    """Whether a rationale may be trained on as correct: its own final answer, where one can be
    read off it, matches the gold answer. Our choice: a rationale whose answer cannot be read off
    (no final number, say) counts as correct; the teacher step has already filtered generated
    ones by their answers, and released data sets were filtered the same way by their authors."""
    from kpod.data.answers import answers_match, extract_answer

    if not example.rationale or example.answer_kind != "number":
        return True
    found = extract_answer(example.rationale, "number")
    return found is None or answers_match(found, example.answer)


def choose_rationales(examples: Sequence[Example], per_question: int | None, seed: int = 0) -> list[Example]:
    """At most ``per_question`` rationales of each question (``None``: all, unchanged), drawn by
    ``seed`` among its correct ones (:func:`rationale_is_correct`); the draw for a question depends
    only on the seed and its qid, and the kept rationales stay in file order."""
    if per_question is None:
        return list(examples)
    if per_question < 1:
        raise DataError(f"rationales_per_question must be at least 1, got {per_question}")
    import random

    by_question: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        if rationale_is_correct(e):
            by_question.setdefault(e.qid, []).append(i)
    keep: set[int] = set()
    for qid, indices in by_question.items():
        if len(indices) > per_question:
            indices = random.Random(f"kpod-rationales-{seed}-{qid}").sample(indices, per_question)
        keep.update(indices)
    return [e for i, e in enumerate(examples) if i in keep]
