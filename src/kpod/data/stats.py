"""``kpod data stats``: what a data file holds, and what is wrong with it."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kpod.data.answers import ANSWER_PHRASE, answers_match, extract_answer
from kpod.data.loaders import ANSWER_FIELDS, LoadReport
from kpod.data.schema import Example


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def answer_round_trips(example: Example) -> bool:
    """Whether the gold answer, written after the template phrase, is extracted back unchanged."""
    text = f"{ANSWER_PHRASE} {example.answer}."
    if example.answer_kind == "choice":
        text = f"{ANSWER_PHRASE} ({example.answer})."
    predicted = extract_answer(text, example.answer_kind, example.choices)
    return answers_match(predicted, example.answer, example.answer_kind)


def compute_stats(examples: Sequence[Example], report: LoadReport, tokenizer: Any = None) -> dict[str, Any]:
    """Statistics of loaded examples; ``tokenizer`` (a Hugging Face tokenizer) adds token lengths.

    ``answer_parse_rate`` is the share of records whose gold answer both parses and survives a
    round trip through the answer extractor (so evaluation can score it). ``problems`` lists what a
    user should look at: skipped records, rationales whose own final number disagrees with the
    gold answer, duplicate rationales, single-step rationales.
    """
    n_records = report.n_records
    answer_failures = sum(n for f, n in report.skipped_fields.items() if f in ANSWER_FIELDS)
    round_trip_failures = sum(1 for e in examples if not answer_round_trips(e))
    parsed = n_records - answer_failures - round_trip_failures
    with_rationale = [e for e in examples if e.has_rationale]
    steps = [len(e.steps) for e in with_rationale]
    disagree = [
        e.qid
        for e in with_rationale
        if e.answer_kind == "number"
        and extract_answer(e.rationale, "number") is not None
        and not answers_match(extract_answer(e.rationale, "number"), e.answer)
    ]
    duplicates = len(with_rationale) - len({(e.qid, e.rationale) for e in with_rationale})
    problems: list[str] = []
    if report.n_skipped:
        problems.append(report.summary())
        problems.extend(report.first_errors)
    if round_trip_failures:
        problems.append(f"{round_trip_failures} gold answers do not survive the answer extractor")
    if disagree:
        problems.append(
            f"{len(disagree)} rationales end on a number other than the gold answer (e.g. {disagree[0]})"
        )
    if duplicates:
        problems.append(f"{duplicates} duplicate rationales of the same question")
    single = sum(1 for n in steps if n == 1)
    if single:
        problems.append(f"{single} rationales have a single step")
    stats: dict[str, Any] = {
        "source": report.source,
        "n_records": n_records,
        "n_examples": len(examples),
        "n_questions": len({e.qid for e in examples}),
        "rationales_per_question": _summary(list(Counter(e.qid for e in with_rationale).values())),
        "n_with_rationale": len(with_rationale),
        "answer_parse_rate": round(parsed / n_records, 6) if n_records else 0.0,
        "answer_kinds": dict(Counter(e.answer_kind for e in examples)),
        "mean_steps": round(statistics.fmean(steps), 3) if steps else 0.0,
        "steps": _summary(steps),
        "steps_histogram": dict(sorted(Counter(steps).items())),
        "rationale_answer_disagreements": len(disagree),
        "skipped": dict(report.skipped),
        "problems": problems,
    }
    if tokenizer is not None:
        q_lens = [len(tokenizer(e.question, add_special_tokens=False)["input_ids"]) for e in examples]
        r_lens = [len(tokenizer(e.rationale, add_special_tokens=False)["input_ids"]) for e in with_rationale]
        stats["tokens"] = {"question": _summary(q_lens), "rationale": _summary(r_lens)}
    return stats


def _per_question_line(stats: dict[str, Any]) -> list[str]:
    per = stats.get("rationales_per_question")
    if not per:
        return []
    return [f"rationales/q.      mean {per['mean']}, max {per['max']}"]


def format_stats(stats: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`compute_stats`."""
    lines = [
        f"source             {stats['source']}",
        f"examples           {stats['n_examples']} ({stats['n_with_rationale']} with a rationale)",
        f"questions          {stats['n_questions']}",
        *_per_question_line(stats),
        f"answer parse rate  {100 * stats['answer_parse_rate']:.2f} %",
        f"answer kinds       {stats['answer_kinds']}",
    ]
    if stats["steps"]:
        s = stats["steps"]
        lines.append(
            f"steps/rationale    mean {s['mean']}, median {s['p50']}, p95 {s['p95']}, max {s['max']}"
        )
        lines.append(f"steps histogram    {stats['steps_histogram']}")
    for name, summary in stats.get("tokens", {}).items():
        if summary:
            lines.append(
                f"tokens ({name:9s}) mean {summary['mean']}, median {summary['p50']}, "
                f"p95 {summary['p95']}, max {summary['max']}"
            )
    lines.append("problems           " + ("none" if not stats["problems"] else ""))
    lines.extend(f"  - {p}" for p in stats["problems"])
    return "\n".join(lines)
