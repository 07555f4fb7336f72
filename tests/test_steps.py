import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kpod.data.steps import split_steps


def texts(rationale: str) -> list[str]:
    return [s.text for s in split_steps(rationale)]


@pytest.mark.parametrize(
    "rationale, expected",
    [
        ("A.\nB.", ["A.", "B."]),
        ("He has 5. She has 6.", ["He has 5.", "She has 6."]),
        ("It costs $0.83 each. So 2 cost $1.66.", ["It costs $0.83 each.", "So 2 cost $1.66."]),
        ("He earns 110*.3=33 dollars. Done.", ["He earns 110*.3=33 dollars.", "Done."]),
        ("They raised 1,000.50 in total. Then more.", ["They raised 1,000.50 in total.", "Then more."]),
        (
            "Mr. Smith and Dr. Jones left at 5 p.m. today. Then e.g. this.",
            ["Mr. Smith and Dr. Jones left at 5 p.m. today.", "Then e.g. this."],
        ),
        ("J. K. Rowling wrote 7 books. I. Am. Here.", ["J. K. Rowling wrote 7 books.", "I.", "Am.", "Here."]),
        (
            "1. Initial amounts:\n   • John has 35 apples\n2. Bought:",
            ["1. Initial amounts:", "• John has 35 apples", "2. Bought:"],
        ),
        ("Is it 5? Yes! It is.", ["Is it 5?", "Yes!", "It is."]),
        ("He put it in. Then he left.", ["He put it in.", "Then he left."]),
        ("No final period", ["No final period"]),
        ("  \n\n  ", []),
    ],
)
def test_split_rules(rationale: str, expected: list[str]) -> None:
    assert texts(rationale) == expected


def test_spans_point_into_the_rationale() -> None:
    rationale = "  First step.  Second step.\n\nThird step"
    for step in split_steps(rationale):
        assert rationale[step.start : step.end] == step.text
        assert step.text == step.text.strip()


sentence = st.text(alphabet=st.sampled_from(list("ab 19.,$\n?")), min_size=0, max_size=60)


@given(sentence)
def test_steps_cover_the_rationale_modulo_whitespace(rationale: str) -> None:
    steps = split_steps(rationale)
    assert re.sub(r"\s+", "", "".join(s.text for s in steps)) == re.sub(r"\s+", "", rationale)
    # Spans are ordered and disjoint, and nothing but whitespace lies between them.
    pos = 0
    for s in steps:
        assert s.start >= pos and s.end > s.start
        assert rationale[pos : s.start].strip() == ""
        pos = s.end
    assert rationale[pos:].strip() == ""


@given(st.lists(st.decimals(min_value=0, max_value=10**6, places=2), min_size=1, max_size=5))
def test_never_splits_inside_a_decimal(values) -> None:
    rationale = " ".join(f"Then we pay {v} dollars." for v in values)
    assert len(split_steps(rationale)) == len(values)


def test_first_missing_step_finds_where_a_generation_departs_from_the_reference() -> None:
    from kpod.data.steps import first_missing_step

    steps = [
        "He has 40 apples.",
        "He buys 3 * 4 = 12 more.",
        "Then 40 + 12 = 1,052 in all.",
        "Half: 1052 / 2 = 526.",
    ]
    assert first_missing_step(steps, "40 apples, 12 more, 1052.0 in all, 526 each") is None  # any form
    assert first_missing_step(steps, "40 and 3 * 4 = 12, then 40 + 12 = 52.") == 2
    assert first_missing_step(steps, "He has 40, buys 3 * 5 = 15.") == 1
    # A slash is a division, not the fraction 1052/2 = 526: the last result is not written.
    assert first_missing_step(steps, "40, 12, 1,052, then 1052 / 2 = 520") == 3
    # A step without a number is passed over.
    assert first_missing_step(["Let T be the tube.", "So T = 50."], "T is 50") is None
