"""Answer normalisation, extraction from generated text, and comparison.

Every accuracy kpod reports goes through :func:`extract_answer` and :func:`answers_match`, so the
rules are spelled out here and each has a regression test.

Numbers
    A number is an optional sign (``-`` or the Unicode minus), an optional currency symbol, digits
    with optional thousands separators (``1,000``: groups of exactly three), an optional decimal
    part, and an optional ``/denominator`` (``3/4``). A trailing period (``"20."``), percent sign,
    closing bracket or unit is not part of it. A comma is never a number on its own, and a comma
    between numbers that is not a thousands separator (``"1, 2"``, ``"1,2"``) separates them.
    Values are parsed exactly (:class:`fractions.Fraction`), never with ``eval``.

Extraction (first rule that yields an answer wins; :func:`extract_answer_detail` says which)
    1. ``template``: the text after the *last* "the answer is" (the paper's template phrase
       "Therefore, the answer is"; case-insensitive), up to the end of its line;
    2. ``boxed``: the content of the last ``\\boxed{...}``;
    3. ``gsm8k``: the text after the last ``####``;
    4. ``answer-colon``: the text after the last "answer:" ;
    5. ``last``: for numbers, the last number anywhere in the text; for choices, the last
       standalone option label in parentheses; never for free text.
    Within a segment from rules 1-4 the *first* number is taken (the answer is stated first, and
    explanations or units may follow it).

Written arithmetic (:func:`written_equations`)
    A diagnostic of a rationale, not of its answer: the equations ``a op b [op c ...] = r`` it
    writes with numbers only (operators ``+ - * x × / ÷``, usual precedence), each checked exactly.
    The keypoint tokens KPOD weights most are these numbers and operators, so the share of written
    results that are wrong says whether weighting them more made the student compute better.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from kpod.data.schema import AnswerKind, Choice

_SIGN = r"(?P<sign>[-\u2212])?"
_CURRENCY = r"(?:[$\u20ac\u00a3\u00a5]\s?)?"
_UNSIGNED = r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_DENOM = r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
# Not glued to a preceding word character, digit or decimal point, nor to a following digit.
NUMBER_RE = re.compile(
    r"(?<![\w.])" + _SIGN + _CURRENCY + r"(?P<sign2>-)?" + _UNSIGNED + _DENOM + r"(?![\d])"
)

_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD_NUMBER_RE = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.IGNORECASE)

_TEMPLATE_RE = re.compile(r"the answer is\s*:?", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_GSM8K_RE = re.compile(r"####")
_COLON_RE = re.compile(r"\banswer\s*:", re.IGNORECASE)

ANSWER_PHRASE = "Therefore, the answer is"


def parse_number(text: str) -> Fraction | None:
    """The value of the first number in ``text``, or ``None`` if it has none."""
    match = NUMBER_RE.search(text)
    return _match_value(match) if match else None


def find_numbers(text: str) -> list[Fraction]:
    """The values of every number in ``text``, in order."""
    values = (_match_value(m) for m in NUMBER_RE.finditer(text))
    return [v for v in values if v is not None]


def _match_value(match: re.Match[str]) -> Fraction | None:
    value = Fraction(match.group("num").replace(",", ""))
    den = match.group("den")
    if den is not None:
        den_value = Fraction(den)
        if den_value == 0:
            return None
        value /= den_value
    if match.group("sign") or match.group("sign2"):
        value = -value
    return value


def format_number(value: Fraction) -> str:
    """Canonical text of a number: ``"1200"``, ``"0.75"``, ``"-3"``; ``"1/3"`` when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    # A finite decimal: scale by a power of ten until integral.
    scale = 0
    scaled = value
    while scaled.denominator != 1:
        scaled *= 10
        scale += 1
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled.numerator)).rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def normalize_text(text: str) -> str:
    """Lower-case, strip accents, punctuation, articles and extra whitespace (free-text answers)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_answer(raw: str | int | float, kind: AnswerKind = "number") -> str | None:
    """The canonical form of a *gold* answer, or ``None`` if it cannot be read as ``kind``.

    Numbers: ``"1,200"`` -> ``"1200"``, ``"36.0"`` -> ``"36"``, ``"9 (apples)"`` -> ``"9"``,
    ``"$1,000.50"`` -> ``"1000.5"``, ``"3/4"`` -> ``"0.75"``. Choices: the upper-case option label.
    Text: :func:`normalize_text`.
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        if isinstance(raw, float) and raw != raw:  # NaN
            return None
        return format_number(Fraction(str(raw))) if kind == "number" else str(raw)
    text = str(raw).strip()
    if not text:
        return None
    if kind == "number":
        # Exactly one number once parenthesised notes ("9 (apples)") are removed: "2:3" or
        # "3 (pies); 4 (cakes)" are not single numbers and must not be read as their first one.
        numbers = NUMBER_RE.findall(re.sub(r"\([^)]*\)", " ", text))
        if len(numbers) != 1:
            return None
        value = parse_number(re.sub(r"\([^)]*\)", " ", text))
        return None if value is None else format_number(value)
    if kind == "choice":
        m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", text)
        return m.group(1).upper() if m else None
    norm = normalize_text(text)
    return norm or None


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_answer_detail` found: the normalised answer and the rule that found it."""

    answer: str | None
    rule: str | None


def _segments(text: str) -> list[tuple[str, str]]:
    """Candidate answer segments, in rule order: (rule name, segment text)."""
    found: list[tuple[str, str]] = []
    matches = list(_TEMPLATE_RE.finditer(text))
    if matches:
        found.append(("template", text[matches[-1].end() :].lstrip().split("\n", 1)[0]))
    boxed = list(_BOXED_RE.finditer(text))
    if boxed:
        found.append(("boxed", _balanced(text, boxed[-1].end())))
    hashes = list(_GSM8K_RE.finditer(text))
    if hashes:
        found.append(("gsm8k", text[hashes[-1].end() :].strip().split("\n", 1)[0]))
    colon = list(_COLON_RE.finditer(text))
    if colon:
        found.append(("answer-colon", text[colon[-1].end() :].strip().split("\n", 1)[0]))
    return found


def _balanced(text: str, start: int) -> str:
    """The text from ``start`` up to the brace that closes the one just before it."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:]


def _number_in(segment: str) -> str | None:
    value = parse_number(segment)
    if value is None:
        word = _WORD_NUMBER_RE.search(segment)
        if word is None:
            return None
        value = Fraction(_WORD_NUMBERS[word.group(1).lower()])
    return format_number(value)


def _choice_in(segment: str, choices: Sequence[Choice]) -> str | None:
    labels = {c.label.upper() for c in choices} or set("ABCDE")
    m = re.search(r"\(([A-Za-z])\)", segment)
    if m and m.group(1).upper() in labels:
        return m.group(1).upper()
    m = re.match(r"\s*([A-Za-z])(?:[.):\s]|$)", segment)
    if m and m.group(1).upper() in labels:
        return m.group(1).upper()
    norm_segment = normalize_text(segment)
    # Option text: the longest option whose normalised text occurs in the segment.
    hits = [
        c for c in choices if normalize_text(c.text) and f" {normalize_text(c.text)} " in f" {norm_segment} "
    ]
    if hits:
        return max(hits, key=lambda c: len(c.text)).label.upper()
    return None


def extract_answer_detail(
    text: str, kind: AnswerKind = "number", choices: Sequence[Choice] = ()
) -> Extraction:
    """Extract the answer from a generated text; see the module docstring for the rules."""
    for rule, segment in _segments(text):
        if kind == "number":
            answer = _number_in(segment)
        elif kind == "choice":
            answer = _choice_in(segment, choices)
        else:
            answer = normalize_text(segment.strip().rstrip(".")) or None
        if answer is not None:
            return Extraction(answer, rule)
    if kind == "number":
        numbers = find_numbers(text)
        if numbers:
            return Extraction(format_number(numbers[-1]), "last")
    elif kind == "choice":
        labels = {c.label.upper() for c in choices} or set("ABCDE")
        hits = [
            m.group(1).upper() for m in re.finditer(r"\(([A-Za-z])\)", text) if m.group(1).upper() in labels
        ]
        if hits:
            return Extraction(hits[-1], "last")
    return Extraction(None, None)


def extract_answer(text: str, kind: AnswerKind = "number", choices: Sequence[Choice] = ()) -> str | None:
    """The normalised answer found in a generated ``text``, or ``None``."""
    return extract_answer_detail(text, kind, choices).answer


def answers_match(
    predicted: str | None, gold: str, kind: AnswerKind = "number", rel_tol: float = 1e-4
) -> bool:
    """Whether a normalised predicted answer equals the gold one.

    Numbers are compared by value with a relative tolerance (``|p - g| <= rel_tol * max(1, |g|)``),
    so ``"0.3333"`` matches ``"1/3"`` and ``"36"`` matches ``"36.0"``.
    """
    if predicted is None:
        return False
    if kind == "number":
        p, g = parse_number(predicted), parse_number(gold)
        if p is None or g is None:
            return False
        return abs(float(p) - float(g)) <= rel_tol * max(1.0, abs(float(g)))
    if kind == "choice":
        return predicted.strip().upper() == gold.strip().upper()
    return normalize_text(predicted) == normalize_text(gold)


def split_answer_phrase(text: str) -> tuple[str, str | None]:
    """Split a rationale that ends with the template phrase into (rationale, answer phrase).

    ``"A. B. Therefore, the answer is 6."`` -> ``("A. B.", "Therefore, the answer is 6.")``.
    Only a phrase in the last line or sentence counts; the rationale is right-stripped.
    """
    matches = list(re.finditer(r"(?:therefore,?\s*)?the answer is", text, re.IGNORECASE))
    if not matches:
        return text.rstrip(), None
    last = matches[-1]
    tail = text[last.start() :]
    # The phrase must be the rationale's conclusion, not a sentence in the middle of it.
    if "\n" in tail.strip() or re.search(r"\.\s+\S", tail.rstrip().rstrip(".")):
        return text.rstrip(), None
    return text[: last.start()].rstrip(), tail.strip()


# Written arithmetic: numbers as above but unsigned (a minus is an operator here), with an optional
# currency symbol; an operator is one of + - * x × / ÷ (x only between spaces or digits).
_EQ_NUMBER = r"(?:[$\u20ac\u00a3\u00a5]\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_EQ_OPERATORS = "-+*/\u00d7\u00f7x\u2212"  # in a character class, "-" first
_EQ_OPERATOR = rf"\s*[{_EQ_OPERATORS}]\s*"
_EQUATION_RE = re.compile(
    rf"(?<![\w.,])(?P<lhs>{_EQ_NUMBER}(?:{_EQ_OPERATOR}{_EQ_NUMBER})+)\s*=\s*(?P<rhs>{_EQ_NUMBER})(?P<percent>\s?%)?(?!\d|\.\d)"
)
_EQ_TOKEN_RE = re.compile(rf"({_EQ_NUMBER})|([{_EQ_OPERATORS}])")
_OPERATOR_CHARS = _EQ_OPERATORS + "(^"
_CHAIN_RE = re.compile(r"\s*(?:[-+*/\u00d7\u00f7\u2212^]|x(?=\s*[\d$]))")


@dataclass(frozen=True)
class Equation:
    """One written equation: its text, the value of its left side and the result written."""

    text: str
    value: Fraction
    written: Fraction

    @property
    def correct(self) -> bool:
        """Exact, or the value rounded to the decimals written, to the nearest or down (``10 / 3 =
        3.33``, ``7 * 0.5 = 3``: gsm_symbolic's own solutions truncate where the problem counts whole
        things); anything else is a slip (``7 / 2 = 4.5``)."""
        if self.value == self.written:
            return True
        decimals = re.sub(r"[^\d.]", "", self.text.rsplit("=", 1)[1]).partition(".")[2]
        scale = 10 ** len(decimals)
        scaled = self.value * scale
        return self.written * scale in (math.floor(scaled), math.floor(scaled + Fraction(1, 2)))


def _eq_value(token: str) -> Fraction:
    return Fraction(re.sub(r"[^\d.]", "", token))


_PLAIN_NUMBER_RE = re.compile(rf"(?<![\w.,]){_EQ_NUMBER}(?![\d])")


def plain_numbers(text: str) -> list[Fraction]:
    """The values of the unsigned numbers ``text`` writes, a slash between two of them being a
    division (two numbers), not a fraction as in :func:`find_numbers`: what a rationale computes
    with."""
    return [_eq_value(m.group(0)) for m in _PLAIN_NUMBER_RE.finditer(text)]


def _evaluate_expression(text: str) -> Fraction | None:
    """``text`` (numbers and operators only) with * and / before + and -; ``None`` on a division by 0."""
    terms: list[Fraction] = []
    signs: list[int] = []
    sign, product, operator = 1, None, None
    for number, op in _EQ_TOKEN_RE.findall(text):
        if number:
            value = _eq_value(number)
            if product is None:
                product = value
            elif operator in ("/", "\u00f7"):
                if value == 0:
                    return None
                product /= value
            else:
                product *= value
        elif op in ("+", "-", "\u2212"):
            terms.append(product)
            signs.append(sign)
            sign, product, operator = (1 if op == "+" else -1), None, None
        else:
            operator = op
    terms.append(product)
    signs.append(sign)
    return sum((s * t for s, t in zip(signs, terms, strict=True)), Fraction(0))


def written_equations(text: str) -> list[Equation]:
    """The equations of numbers only that ``text`` writes, each with its exact value.

    Left out, because their value cannot be read from the numbers alone: an equation whose left
    side continues an expression (an operator, bracket, letter or digit just before it: ``T + 3 =
    5``, ``2 * (3 + 4) = 14``), whose result is followed by another operator (a chain such as ``5 +
    3 = 8 + 2 = 10``, whose links are expressions, not numbers), and one that divides by zero. An
    equation after an equals sign counts (``T = 186 - 144 = 42``); a result in per cent is read as
    such (``16 / 20 = 80%``)."""
    found = []
    for match in _EQUATION_RE.finditer(text):
        before = text[: match.start()].rstrip()[-2:]  # an operator, unless a word's x ("box")
        if (
            before[-1:]
            and before[-1] in _OPERATOR_CHARS
            and not (before[-1] == "x" and before[:-1].isalpha())
        ):
            continue
        if _CHAIN_RE.match(text, match.end()):
            continue
        value = _evaluate_expression(match.group("lhs"))
        if value is None:
            continue
        written = _eq_value(match.group("rhs")) / (100 if match.group("percent") else 1)
        found.append(Equation(match.group(0), value, written))
    return found
