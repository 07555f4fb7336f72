"""The one example type every stage of kpod reads.

An :class:`Example` is one rationale of one question. Several rationales of the same question
(e.g. several teacher samples) are several examples sharing ``qid``; splits are always made by
``qid`` so that no question leaks from train into dev or test.

Steps carry their character span in ``rationale`` so that token weights and stage-wise labels
can later be aligned to any tokenizer through its offset mapping, never by re-searching token
strings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AnswerKind = Literal["number", "choice", "text"]
ANSWER_KINDS: tuple[str, ...] = ("number", "choice", "text")


@dataclass(frozen=True)
class Span:
    """A half-open character span ``[start, end)`` of a text."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad span [{self.start}, {self.end})")


@dataclass(frozen=True)
class Step:
    """One reasoning step: ``rationale[start:end] == text``."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Choice:
    """One option of a multiple-choice question, e.g. ``Choice("A", "ignore")``."""

    label: str
    text: str


@dataclass(frozen=True)
class Example:
    """One rationale of one question.

    Attributes:
        qid: question id; shared by every rationale of the same question.
        question: the question text as the student will see it.
        rationale: the step-by-step rationale, without the final answer phrase
            ("Therefore, the answer is ..."); ``""`` for evaluation-only records.
        steps: the rationale's steps with their character spans in ``rationale``.
        answer: the gold answer, normalised (see :func:`kpod.data.answers.normalize_answer`).
        answer_kind: ``"number"``, ``"choice"`` (``answer`` is the option label) or ``"text"``.
        choices: the options of a multiple-choice question, else ``()``.
        source: where the record came from (a dataset name such as ``"gsm8k"``).
        provenance: free-form facts about the record: file and line, teacher model, prompt hash...
        keypoints: ground-truth keypoint spans in ``rationale`` (only the synthetic data has them).
    """

    qid: str
    question: str
    rationale: str
    steps: tuple[Step, ...]
    answer: str
    answer_kind: AnswerKind = "number"
    choices: tuple[Choice, ...] = ()
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    keypoints: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, got {self.answer_kind!r}")
        for step in self.steps:
            if self.rationale[step.start : step.end] != step.text:
                raise ValueError(
                    f"step span [{step.start}, {step.end}) does not match its text {step.text!r}"
                )

    @property
    def has_rationale(self) -> bool:
        return bool(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(
            qid=str(d["qid"]),
            question=d["question"],
            rationale=d.get("rationale", ""),
            steps=tuple(Step(**s) for s in d.get("steps", ())),
            answer=str(d["answer"]),
            answer_kind=d.get("answer_kind", "number"),
            choices=tuple(Choice(**c) for c in d.get("choices", ())),
            source=d.get("source", ""),
            provenance=dict(d.get("provenance", {})),
            keypoints=tuple(Span(**k) for k in d.get("keypoints", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)
