"""Offline data: our seeded arithmetic generator with ground-truth keypoints, and gsm_symbolic.

``arithmetic``
    Multi-step word problems (2 to 6 steps) whose rationales are written in a verbose teacher
    style: each step states a quantity or an operation between varied filler phrases. The
    generator records the ground-truth keypoint spans: every quantity, operator, "=" and result.
    Everything else (names, objects, filler) is not a keypoint, which lets us measure whether
    token weighting finds keypoints (ROC-AUC of the learned weights, issue #4).
``gsm-symbolic``
    GSM8K-style problems from ``reasoning-gym``'s ``gsm_symbolic`` generator (PyPI, Apache-2.0),
    converted to GSM8K records (``question`` and a solution ending in ``#### N``) and read through
    the GSM8K loader, exactly as a user's GSM8K file would be.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from kpod.data.answers import answers_match, format_number, normalize_answer
from kpod.data.loaders import LoadReport, _Reader, _Record, gsm8k_record_to_example
from kpod.data.schema import Example, Span
from kpod.data.steps import split_steps
from kpod.errors import DataError

NAMES = (
    "Ava Ben Carla Diego Emma Farid Grace Hiro Ines Jamal Kira Liam Maya Noah Olga Pedro Quinn Rosa "
    "Sam Tara Umar Vera Wes Yara Zoe"
).split()
ITEMS = "marbles stickers apples pencils coins cookies stamps shells books cards beads tickets".split()
OPENERS = (
    "Let's think about this carefully and go through it one piece at a time.",
    "Okay, so let's take a careful look at what the problem is telling us here.",
    "Alright, we need to work through this problem in a calm and organised way.",
    "To answer this question, it really helps to go through the story step by step.",
)
FILLERS = (
    "as we can clearly see from the problem",
    "which is what the question tells us",
    "if we think about it for a moment",
    "and this is an important detail to keep in mind",
    "in other words, nothing surprising here",
    "so to speak",
    "based on the information that was given",
    "just as the story describes it",
)
CONNECTORS = ("Next,", "After that,", "Then,", "Moving on,", "Following this,", "Now,")


@dataclass
class _Writer:
    """Accumulates text and the spans of the pieces marked as keypoints."""

    text: str = ""
    keypoints: list[Span] = field(default_factory=list)

    def add(self, piece: str, key: bool = False) -> None:
        if key:
            self.keypoints.append(Span(len(self.text), len(self.text) + len(piece)))
        self.text += piece

    def equation(self, a: int, op: str, b: int, result: int) -> None:
        """``a op b = result`` with every number, the operator and '=' as keypoints."""
        self.add(str(a), True)
        self.add(" ")
        self.add(op, True)
        self.add(" ")
        self.add(str(b), True)
        self.add(" ")
        self.add("=", True)
        self.add(" ")
        self.add(str(result), True)


def _arithmetic_problem(rng: random.Random, qid: str) -> Example:
    name = rng.choice(NAMES)
    other = rng.choice([n for n in NAMES if n != name])
    item = rng.choice(ITEMS)
    n_ops = rng.randint(1, 5)  # plus the opening statement: 2 to 6 steps
    total = rng.randint(5, 40)
    question = [f"{name} has {total} {item}."]
    w = _Writer()
    w.add(rng.choice(OPENERS) + " ")
    w.add(f"At the start, {name} has ")
    w.add(str(total), True)
    w.add(f" {item}, {rng.choice(FILLERS)}.")
    for _ in range(n_ops):
        op = rng.choice(("add", "sub", "mul", "div") if total <= 200 else ("sub", "div"))
        if op == "div" and not [d for d in (2, 3, 4, 5) if total % d == 0]:
            op = "add"
        if op == "sub" and total < 2:
            op = "add"
        w.add(" " + rng.choice(CONNECTORS) + " ")
        if op == "add":
            k = rng.randint(2, 30)
            question.append(f"Then {name} gets {k} more {item} from {other}.")
            w.add(f"{name} gets ")
            w.add(str(k), True)
            w.add(f" more {item} from {other}, {rng.choice(FILLERS)}, so now there are ")
            w.equation(total, "+", k, total + k)
            total += k
        elif op == "sub":
            k = rng.randint(1, total - 1)
            question.append(f"Then {name} gives {k} {item} to {other}.")
            w.add(f"{name} gives away ")
            w.add(str(k), True)
            w.add(f" {item} to {other}, {rng.choice(FILLERS)}, which leaves ")
            w.equation(total, "-", k, total - k)
            total -= k
        elif op == "mul":
            k = rng.choice((2, 3, 4))
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
            question.append(f"Then {name} {word} the number of {item}.")
            w.add(f"the number of {item} {word}, {rng.choice(FILLERS)}, which means we compute ")
            w.equation(total, "*", k, total * k)
            total *= k
        else:
            k = rng.choice([d for d in (2, 3, 4, 5) if total % d == 0])
            question.append(f"Then {name} shares the {item} equally among {k} friends and keeps one share.")
            w.add(f"the {item} are split equally into ")
            w.add(str(k), True)
            w.add(f" shares, {rng.choice(FILLERS)}, and one share is ")
            w.equation(total, "/", k, total // k)
            total //= k
        w.add(".")
    question.append(f"How many {item} does {name} have at the end?")
    # The opener is a sentence of its own; merge it into the first step so there are n_ops + 1 steps.
    rationale = w.text
    steps = split_steps(rationale)
    first_end = steps[1].end
    steps = (type(steps[0])(rationale[:first_end], 0, first_end),) + steps[2:]
    return Example(
        qid=qid,
        question=" ".join(question),
        rationale=rationale,
        steps=steps,
        answer=format_number(Fraction(total)),
        answer_kind="number",
        source="synthetic",
        provenance={"generator": "kpod.synthetic.arithmetic"},
        keypoints=tuple(w.keypoints),
    )


def arithmetic_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` seeded arithmetic word problems with ground-truth keypoint spans."""
    rng = random.Random(seed)
    return [_arithmetic_problem(rng, f"synthetic-{seed}-{i}") for i in range(n)]


GSM_SYMBOLIC_SUFFIX = "Give the result as your final answer. Do not include units."


GENERATION_ATTEMPTS = 20


def _generate(generator, draw: str, template: int) -> dict:
    """One problem of a gsm_symbolic template. Some templates' generators give up on some random
    draws (``ValueError``: no numbers satisfy their constraints); such a draw is retried with the
    next seed string (``draw-1``, ``draw-2``, ...), so every other problem stays as it was."""
    for attempt in range(GENERATION_ATTEMPTS):
        try:
            return generator(random.Random(draw if attempt == 0 else f"{draw}-{attempt}"), 1.0)
        except ValueError:
            continue
    raise DataError(f"gsm-symbolic template {template} found no valid problem in {GENERATION_ATTEMPTS} draws")


def gsm_symbolic_records(n: int, seed: int = 0, templates: Sequence[int] = ()) -> Iterator[dict[str, str]]:
    """``n`` GSM8K-format records (``question``, ``answer`` ending in ``#### N``) from gsm_symbolic.

    ``templates`` restricts the problems to these generator ids of reasoning-gym (each generator is
    one GSM8K problem turned into a template), taken in turn; empty: reasoning-gym's own mix.
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise DataError(
            "gsm-symbolic data needs the 'reasoning-gym' package: pip install 'kpod[offline]'"
        ) from err
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=max(n, 1), seed=seed)
    if templates:
        unknown = sorted(set(templates) - set(dataset.generators))
        if unknown:
            raise DataError(f"gsm-symbolic has no template {unknown[0]}; ids: {sorted(dataset.generators)}")
        items = (
            {
                **_generate(
                    dataset.generators[templates[i % len(templates)]],
                    f"{seed}-{i}",
                    templates[i % len(templates)],
                ),
                "template": templates[i % len(templates)],
            }
            for i in range(n)
        )
    else:
        items = ({**item, "template": dataset.task_indices[i]} for i, item in enumerate(dataset))
    for item in items:
        question = item["question"].replace(GSM_SYMBOLIC_SUFFIX, "").strip()
        solution = item["metadata"]["answer_cot"].strip()
        if "####" not in solution:
            solution = f"{solution}\n#### {item['answer']}"
        yield {
            "question": question,
            "answer": solution,
            "gold": str(item["answer"]),
            "template": str(item["template"]),
        }


def gsm_symbolic_examples(
    n: int, seed: int = 0, *, skip_invalid: bool = True, templates: Sequence[int] = ()
) -> tuple[list[Example], LoadReport]:
    """gsm_symbolic problems read through the GSM8K path.

    A record whose ``#### N`` disagrees with the generator's own answer is invalid (skipped and
    counted by default); so is one whose solution the GSM8K reader rejects.
    """
    source = f"gsm-symbolic-{seed}"
    report = LoadReport(source=f"reasoning-gym:gsm_symbolic(seed={seed})")
    reader = _Reader(report.source, "gsm-symbolic", skip_invalid, report)

    def convert(rec: _Record) -> list[Example]:
        example = gsm8k_record_to_example(reader, rec, source)
        if not answers_match(example.answer, normalize_answer(rec.data["gold"]) or "", "number"):
            raise reader.error(
                rec, f"'#### {example.answer}' disagrees with the generator's answer", "answer"
            )
        return [replace(example, provenance={**example.provenance, "template": rec.data["template"]})]

    records = (_Record(r, i, "record") for i, r in enumerate(gsm_symbolic_records(n, seed, templates)))
    return reader.run(records, convert), report
