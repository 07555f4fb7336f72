"""Splitting a rationale into reasoning steps (paper section 3.4).

The paper splits on "."; taken literally that breaks decimals ("110*.3=33", "0.83"). The rules here:

1. Newlines split first: each non-blank line is a candidate step.
2. Inside a line, a period ends a step when it is followed by whitespace or the end of the line,
   and it is *not*
   - part of a number (a decimal point or a digit on both sides: "0.83", "1,000.50"),
   - the end of a common abbreviation ("Mr.", "e.g.", "approx.", "p.m.", a single initial "J."),
   - a list marker at the start of a line ("1. Initial amounts:").
   "?" and "!" end a step too when followed by whitespace (rare in rationales, but the same idea).
3. The final answer phrase ("Therefore, the answer is ...") is not a step: callers strip it first
   with :func:`kpod.data.answers.split_answer_phrase`.

Each step is returned with its character span, whitespace around it excluded; concatenating the
steps gives back the rationale modulo whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kpod.data.answers import plain_numbers
from kpod.data.schema import Step

ABBREVIATIONS = frozenset(
    # Only abbreviations that are not also common sentence-final English words ("in", "no").
    """mr mrs ms dr prof sr jr st mt vs etc e.g i.e approx nos fig figs eq eqs ca cf
    a.m p.m u.s jan feb apr jun jul aug sep sept oct nov dec tue thu fri
    ft lb lbs oz min sec hr hrs km cm mm kg mi yd qt gal""".split()
)

# A sentence-final mark followed by whitespace or the end of the line.
_END_RE = re.compile(r"[.?!](?=\s|$)")
_LIST_MARKER_RE = re.compile(r"\s*(?:\d+|[A-Za-z])\.$")
_WORD_BEFORE_RE = re.compile(r"([A-Za-z][A-Za-z.]*)$")


def _is_step_end(line: str, dot: int) -> bool:
    """Whether the sentence mark at ``line[dot]`` ends a step."""
    if line[dot] != ".":
        return True
    before = line[: dot + 1]
    if _LIST_MARKER_RE.fullmatch(before):
        return False
    word = _WORD_BEFORE_RE.search(line[:dot])
    if word:
        token = word.group(1).lower()
        if token in ABBREVIATIONS:
            return False
        # A single capital initial ("J. K. Rowling"), but not a sentence ending in "I." or "a".
        if len(token) == 1 and word.group(1).isupper() and token != "i":
            return False
    return True


def split_steps(rationale: str) -> tuple[Step, ...]:
    """The steps of ``rationale`` with their spans; see the module docstring for the rules."""
    steps: list[Step] = []
    offset = 0
    for line in rationale.splitlines(keepends=True):
        start = 0
        for m in _END_RE.finditer(line):
            if _is_step_end(line, m.start()):
                _add(steps, rationale, offset + start, offset + m.end())
                start = m.end()
        _add(steps, rationale, offset + start, offset + len(line))
        offset += len(line)
    return tuple(steps)


def _add(steps: list[Step], text: str, start: int, end: int) -> None:
    """Append ``text[start:end]`` without its surrounding whitespace, if anything is left."""
    chunk = text[start:end]
    stripped = chunk.strip()
    if not stripped:
        return
    lead = len(chunk) - len(chunk.lstrip())
    s = start + lead
    steps.append(Step(text=stripped, start=s, end=s + len(stripped)))


def first_missing_step(steps: Sequence[str], generated: str) -> int | None:
    """The index of the first reference step whose result ``generated`` never writes, or ``None``
    when it writes every one: where a student's rationale first departs from the reference's.

    A step's result is its last number (gsm_symbolic's and the teachers' steps end on what they
    compute); a step without a number is passed over. "Writes" means the value appears anywhere in
    the generated text, in any form (``1,000``, ``1000.0``), so a value that also appears by chance
    (in a restated question, say) counts as written: the index is where the departure is seen, at
    or after where it happened. A diagnostic of the in-rationale curriculum, which trains the last
    steps longest: its students should depart earlier, if anywhere."""
    written = set(plain_numbers(generated))
    for index, step in enumerate(steps):
        numbers = plain_numbers(step)
        if numbers and numbers[-1] not in written:
            return index
    return None
