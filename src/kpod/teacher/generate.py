"""Teacher rationale generation (``kpod teacher generate``) and the answer-correctness filter.

The teacher is prompted with the paper's zero-shot chain-of-thought prompt (Kojima et al.), in one
call: the user turn is ``Q: <question>\\nA: Let's think step by step.`` and a system message asks
the teacher to end with the template phrase "Therefore, the answer is <answer>." so that the
answer extractor of the data layer reads it. (The paper gives no teacher settings; this single-call
form replaces Kojima's second "answer extraction" call.)

Each (question, sample) is one request, stored under (qid, teacher, prompt hash, sample) in a
:class:`~kpod.teacher.store.RationaleStore`; a re-run skips what is stored, so a crash loses at most
the requests in flight and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from tqdm.auto import tqdm

from kpod.data.answers import ANSWER_PHRASE, answers_match, extract_answer
from kpod.data.loaders import make_example
from kpod.data.schema import Choice, Example
from kpod.errors import TeacherError
from kpod.prompt import COT_TRIGGER, PromptFormat, render_prompt
from kpod.teacher.client import BudgetExhausted, Completion, RetriesExhausted
from kpod.teacher.store import RationaleStore, record_key

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = (
    "Solve the problem step by step, one step per sentence. "
    f'End with the sentence "{ANSWER_PHRASE} <answer>."'
)


class Teacher(Protocol):
    model: str

    async def complete(
        self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int, seed: int | None
    ) -> Completion: ...


@dataclass(frozen=True)
class TeacherPrompt:
    """The teacher's prompt; its hash is part of every record's key."""

    system: str | None = DEFAULT_SYSTEM
    trigger: str = COT_TRIGGER

    def messages(self, question: str) -> list[dict[str, str]]:
        out = [] if not self.system else [{"role": "system", "content": self.system}]
        # The paper-style prompt of the shared prompt module: "Q: <question>\nA: <trigger>".
        out.append({"role": "user", "content": render_prompt(question, PromptFormat(trigger=self.trigger))})
        return out

    @property
    def hash(self) -> str:
        payload = json.dumps({"system": self.system, "trigger": self.trigger, "v": 1}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GenerationSettings:
    n_samples: int = 1
    temperature: float = 0.7
    max_tokens: int = 512
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.concurrency < 1 or self.max_tokens < 1 or self.temperature < 0:
            raise TeacherError(f"bad generation settings: {self}")


FAILED = "failed after retries"


@dataclass
class GenerationSummary:
    questions: int = 0
    wanted: int = 0
    already_stored: int = 0
    generated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    left_undone: int = 0
    budget_exhausted: bool = False
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Samples whose requests failed after every retry (not stored: a re-run retries them)."""
        return sum(n for why, n in self.skipped.items() if why.startswith(FAILED))

    @property
    def incomplete(self) -> int:
        """Samples a re-run would still generate: left in the queue or failed after retries."""
        return self.left_undone + self.failed

    def lines(self) -> list[str]:
        out = [
            f"questions {self.questions}, samples wanted {self.wanted}: "
            f"{self.already_stored} already stored, {self.generated} generated now, "
            f"{sum(self.skipped.values())} skipped, {self.left_undone} left undone",
            f"requests {self.requests} ({self.retries} retries) in {self.seconds:.1f} s",
        ]
        out += [f"  skipped {n} x {why}" for why, n in self.skipped.most_common()]
        if self.budget_exhausted:
            out.append("the request budget ran out: re-run to generate the rest")
        if self.failed:
            out.append(f"{self.failed} samples failed after retries: re-run to retry them (the rest is kept)")
        return out


def _sample_seed(qid: str, sample: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{qid}:{sample}".encode()).digest()[:4], "big")


def questions_of(examples: Sequence[Example]) -> list[Example]:
    """One example per question (the first), in order."""
    seen: dict[str, Example] = {}
    for e in examples:
        seen.setdefault(e.qid, e)
    return list(seen.values())


async def generate_rationales(
    examples: Sequence[Example],
    teacher: Teacher,
    store: RationaleStore,
    settings: GenerationSettings = GenerationSettings(),
    prompt: TeacherPrompt = TeacherPrompt(),
    *,
    server: str = "",
    progress: bool = True,
) -> GenerationSummary:
    """Generate the missing (question, sample) completions into ``store``.

    Raises :class:`TeacherError` for faults retrying cannot fix (bad key, unknown model, a server
    that stopped answering); everything stored until then stays stored.
    """
    start = time.perf_counter()
    summary = GenerationSummary()
    questions = questions_of(examples)
    summary.questions = len(questions)
    todo: list[tuple[Example, int]] = []
    for q in questions:
        for sample in range(settings.n_samples):
            summary.wanted += 1
            if (q.qid, teacher.model, prompt.hash, sample) in store:
                summary.already_stored += 1
            else:
                todo.append((q, sample))
    queue: asyncio.Queue[tuple[Example, int]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), desc="teacher", unit="req", disable=not progress or not todo)
    fatal: list[BaseException] = []

    async def worker() -> None:
        while not queue.empty() and not fatal and not summary.budget_exhausted:
            q, sample = queue.get_nowait()
            seed = _sample_seed(q.qid, sample)
            try:
                completion = await teacher.complete(
                    prompt.messages(q.question),
                    temperature=settings.temperature,
                    max_tokens=settings.max_tokens,
                    seed=seed,
                )
            except BudgetExhausted:
                summary.budget_exhausted = True
                queue.put_nowait((q, sample))
                return
            except RetriesExhausted as err:
                summary.skipped[f"{FAILED} ({err})"] += 1
                log.warning("%s sample %d: failed after retries (%s)", q.qid, sample, err)
                bar.update(1)
                continue
            except TeacherError as err:
                fatal.append(err)
                return
            if not completion.text.strip():
                summary.skipped["empty completion"] += 1
                log.warning("%s sample %d: empty completion", q.qid, sample)
            else:
                store.append(
                    {
                        "qid": q.qid,
                        "teacher": teacher.model,
                        "prompt_hash": prompt.hash,
                        "sample": sample,
                        "question": q.question,
                        "gold_answer": q.answer,
                        "answer_kind": q.answer_kind,
                        "choices": [asdict(c) for c in q.choices],
                        "messages": prompt.messages(q.question),
                        "completion": completion.text,
                        "finish_reason": completion.finish_reason,
                        "usage": completion.usage,
                        "temperature": settings.temperature,
                        "max_tokens": settings.max_tokens,
                        "seed": seed,
                        "server": server,
                        "served_model": completion.model,
                        "time": datetime.now(UTC).isoformat(timespec="seconds"),
                        "latency_s": completion.latency_s,
                        "attempts": completion.attempts,
                    }
                )
                summary.generated += 1
            bar.update(1)

    workers = [asyncio.create_task(worker()) for _ in range(min(settings.concurrency, max(1, len(todo))))]
    try:
        await asyncio.gather(*workers)
    finally:
        bar.close()
    summary.left_undone = queue.qsize()
    stats = getattr(teacher, "stats", None)
    if stats is not None:
        summary.requests, summary.retries = stats.requests, stats.retries
    summary.seconds = time.perf_counter() - start
    if fatal:
        raise fatal[0]
    return summary


@dataclass
class FilterReport:
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common()) or "none"
        dropped = sum(self.dropped.values())
        return f"kept {self.kept} rationales with a correct final answer; dropped {dropped} ({reasons})"


def filter_rationales(
    records: Sequence[dict[str, Any]],
    *,
    teacher: str | None = None,
    prompt_hash: str | None = None,
    keep_incorrect: bool = False,
) -> tuple[list[Example], FilterReport]:
    """Examples from stored completions whose final answer matches the gold answer.

    Drop reasons: ``no answer found`` (the extractor finds none), ``wrong answer``,
    ``only an answer phrase`` (no reasoning before it). ``teacher``/``prompt_hash`` restrict the
    records to one run's. ``keep_incorrect`` keeps wrong ones too (marked in provenance).
    """
    report = FilterReport()
    examples: list[Example] = []
    for rec in sorted(records, key=record_key):
        if teacher is not None and rec["teacher"] != teacher:
            continue
        if prompt_hash is not None and rec["prompt_hash"] != prompt_hash:
            continue
        kind = rec.get("answer_kind", "number")
        choices = tuple(Choice(**c) for c in rec.get("choices", []))
        predicted = extract_answer(rec["completion"], kind, choices)
        correct = answers_match(predicted, rec["gold_answer"], kind)
        if predicted is None and not keep_incorrect:
            report.dropped["no answer found"] += 1
            continue
        if not correct and not keep_incorrect:
            report.dropped["wrong answer"] += 1
            continue
        example = make_example(
            qid=rec["qid"],
            question=rec["question"],
            rationale=rec["completion"],
            answer=rec["gold_answer"],
            answer_kind=kind,
            choices=choices,
            source=f"teacher:{rec['teacher']}",
            provenance={
                "teacher": rec["teacher"],
                "prompt_hash": rec["prompt_hash"],
                "sample": rec["sample"],
                "temperature": rec.get("temperature"),
                "time": rec.get("time"),
                "usage": rec.get("usage", {}),
                "teacher_answer": predicted,
                "teacher_correct": correct,
            },
        )
        if not example.steps:
            report.dropped["only an answer phrase"] += 1
            continue
        examples.append(example)
        report.kept += 1
    return examples, report
