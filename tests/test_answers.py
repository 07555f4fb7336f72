from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kpod.data.answers import (
    answers_match,
    extract_answer,
    extract_answer_detail,
    find_numbers,
    format_number,
    normalize_answer,
    parse_number,
    split_answer_phrase,
    written_equations,
)
from kpod.data.schema import Choice


@pytest.mark.parametrize(
    "text, expected",
    [
        # The known traps.
        ("Therefore, the answer is 20.", "20"),
        (r"So the total is \boxed{8,000}.", "8000"),
        ("Therefore, the answer is $1,000.50.", "1000.5"),
        ("Therefore, the answer is -3.", "-3"),
        ("Therefore, the answer is 3/4.", "0.75"),
        ("Therefore, the answer is , 42", "42"),
        # Currency, percent, units, unicode minus, leading decimal point.
        ("Therefore, the answer is €25 per week", "25"),
        ("Therefore, the answer is 40%.", "40"),
        ("Therefore, the answer is 9 apples.", "9"),
        ("Therefore, the answer is \u221212", "-12"),
        ("Therefore, the answer is .5 liters", "0.5"),
        ("Therefore, the answer is 1,234,567", "1234567"),
        # The last template phrase wins; within it the first number.
        ("the answer is 3. Wait, no. Therefore, the answer is 5 (not 3).", "5"),
        ("Therefore, the answer is:\n18", "18"),
        # Word numbers after the phrase.
        ("Therefore, the answer is six.", "6"),
        # Fallbacks.
        ("She has 48/2 = 24 clips.\n#### 24", "24"),
        ("Answer: 17", "17"),
        ("48 + 24 = 72 clips in total.", "72"),
    ],
)
def test_extract_number(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extraction_reports_the_rule() -> None:
    assert extract_answer_detail("Therefore, the answer is 7").rule == "template"
    assert extract_answer_detail(r"\boxed{\frac{1}{2}} or 7").rule == "boxed"
    assert extract_answer_detail("#### 7").rule == "gsm8k"
    assert extract_answer_detail("answer: 7").rule == "answer-colon"
    assert extract_answer_detail("we get 7 apples").rule == "last"
    assert extract_answer_detail("no number here").answer is None


@pytest.mark.parametrize("text", [",", "a, b, and c", "...", "", "Therefore, the answer is unknown"])
def test_no_number_is_invented(text: str) -> None:
    assert extract_answer(text) is None


def test_commas_that_are_not_thousands_separators_split_numbers() -> None:
    assert find_numbers("1, 2, 3") == [1, 2, 3]
    assert find_numbers("1,2") == [1, 2]
    assert find_numbers("pay 1,000 or 1,0000") == [1000, 1, 0]
    assert find_numbers("0.83 and 110*.3=33") == [Fraction("0.83"), 110, Fraction("0.3"), 33]
    assert find_numbers("3-4 apples") == [3, 4]


def test_numbers_glued_to_words_are_not_numbers() -> None:
    assert find_numbers("x2 and abc3") == []


def test_division_by_zero_is_not_a_number() -> None:
    assert parse_number("1/0") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,200", "1200"),
        ("36.0", "36"),
        (27.0, "27"),
        (5, "5"),
        ("9 (apples)", "9"),
        ("$1,000.50", "1000.5"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("-0.50", "-0.5"),
        (" 72 ", "72"),
    ],
)
def test_normalize_number(raw, expected) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw", ["2:3", "3 (pies); 4 (cakes)", "", "none", float("nan"), True])
def test_normalize_rejects_what_is_not_one_number(raw) -> None:
    assert normalize_answer(raw) is None


def test_normalize_choice_and_text() -> None:
    assert normalize_answer("(b)", "choice") == "B"
    assert normalize_answer("C.", "choice") == "C"
    assert normalize_answer("BC", "choice") is None
    assert normalize_answer("The Eiffel Tower!", "text") == "eiffel tower"


def test_numeric_comparison_with_tolerance() -> None:
    assert answers_match("36", "36.0")
    assert answers_match("0.3333", "1/3")
    assert not answers_match("0.33", "1/3")
    assert answers_match("1000000", "1000000.01")
    assert not answers_match("71", "72")
    assert not answers_match(None, "72")


CHOICES = (
    Choice("A", "bank"),
    Choice("B", "library"),
    Choice("C", "department store"),
    Choice("D", "mall"),
    Choice("E", "new york"),
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Therefore, the answer is (C).", "C"),
        ("Therefore, the answer is B.", "B"),
        ("Therefore, the answer is d) mall", "D"),
        ("Therefore, the answer is the department store.", "C"),
        ("Therefore, the answer is New York.", "E"),
        ("It could be (A) or maybe (B)", "B"),
        ("Therefore, the answer is (F).", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice", CHOICES) == expected


def test_extract_text() -> None:
    assert extract_answer("Therefore, the answer is The Nile.", "text") == "nile"
    assert answers_match("the Nile", "Nile", "text")
    assert extract_answer("no phrase at all", "text") is None


def test_never_evaluates_expressions() -> None:
    # An eval()-based parser would compute 6 here or run code.
    assert extract_answer("Therefore, the answer is 2*3") == "2"
    assert extract_answer("Therefore, the answer is __import__('os')") is None


def test_split_answer_phrase() -> None:
    assert split_answer_phrase("A. B. Therefore, the answer is 6.") == (
        "A. B.",
        "Therefore, the answer is 6.",
    )
    assert split_answer_phrase("No phrase here.") == ("No phrase here.", None)
    # A phrase in the middle is part of the reasoning, not the conclusion.
    text = "If the answer is 6 then x = 2.\nSo x is 2."
    assert split_answer_phrase(text) == (text, None)


@given(st.fractions(max_denominator=10**6).filter(lambda f: abs(f) < 10**12))
def test_format_then_parse_round_trips(value: Fraction) -> None:
    assert parse_number(format_number(value)) == value


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_thousands_separated_integers_round_trip(n: int) -> None:
    assert extract_answer(f"Therefore, the answer is {n:,}.") == str(n)


def _checked(text: str) -> list[tuple[str, bool]]:
    return [(e.text, e.correct) for e in written_equations(text)]


@pytest.mark.parametrize(
    "text, expected",
    [
        # Right and wrong results, precedence, currency, thousands separators, the x and unicode signs.
        ("He has 9 * $10 = $90.", [("9 * $10 = $90", True)]),
        ("So 2 + 3 * 4 = 20 in all", [("2 + 3 * 4 = 20", False)]),
        ("So 2 + 3 * 4 = 14 in all", [("2 + 3 * 4 = 14", True)]),
        (
            "1,200 - 200 x 2 = 800 and 14 \u2212 4 = 9.",
            [("1,200 - 200 x 2 = 800", True), ("14 \u2212 4 = 9", False)],
        ),
        ("12 / 4 / 3 = 1, 6 \u00f7 4 = 1.5", [("12 / 4 / 3 = 1", True), ("6 \u00f7 4 = 1.5", True)]),
        # After an equals sign: the numeric part is an equation of its own (here a slip: 42).
        ("Thus, T = 186 - 144 = 52 balls.", [("186 - 144 = 52", False)]),
        # Rounded to the decimals written, to the nearest or down; not up, and not another number.
        (
            "10 / 3 = 3.33 and 2 / 3 = 0.67 and 7 * 0.5 = 3",
            [("10 / 3 = 3.33", True), ("2 / 3 = 0.67", True), ("7 * 0.5 = 3", True)],
        ),
        ("7 / 3 = 3 and 7 / 2 = 4.5", [("7 / 3 = 3", False), ("7 / 2 = 4.5", False)]),
        # A result in per cent.
        ("16 / 20 = 80.0%. 1 / 4 = 20 %", [("16 / 20 = 80.0%", True), ("1 / 4 = 20 %", False)]),
        # Not read: a variable or bracket before, a chain, a division by zero, no operator.
        ("T + 3 = 5, 2 * (3 + 4) = 14, 2T + 3 = 9", []),
        ("5 + 3 = 8 + 2 = 10", []),
        ("4 x 2 + 3 = 11, each box 3 * 4 = 12", [("4 x 2 + 3 = 11", True), ("3 * 4 = 12", True)]),
        ("10 / 0 = 0 and 7 = 7", []),
    ],
)
def test_written_equations(text: str, expected: list[tuple[str, bool]]) -> None:
    assert _checked(text) == expected


def test_written_equations_values_are_exact() -> None:
    (equation,) = written_equations("We get 0.1 + 0.2 = 0.3 exactly")
    assert equation.value == Fraction(3, 10) and equation.written == Fraction(3, 10) and equation.correct
