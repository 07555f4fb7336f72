import pytest

from kpod.data.loaders import make_example
from kpod.models import load_tokenizer
from kpod.prompt import (
    PROMPT_SEGMENT,
    PromptFormat,
    render_example,
    render_prompt,
    token_segments,
    tokenize_rendered,
)

EXAMPLE = make_example(
    qid="q1",
    question="Natalia sold 48 clips in April and half as many in May. How many in all?",
    rationale="Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.",
    answer="72",
)


def test_paper_template_and_spans() -> None:
    r = render_example(EXAMPLE)
    assert r.text == (
        "Q: Natalia sold 48 clips in April and half as many in May. How many in all?\n"
        "A: Let's think step by step. Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips. Therefore, the answer is 72."
    )
    assert r.text[r.prompt.start : r.prompt.end] == render_prompt(EXAMPLE.question)
    assert [r.text[s.start : s.end] for s in r.steps] == [s.text for s in EXAMPLE.steps]
    assert r.text[r.answer.start : r.answer.end] == "Therefore, the answer is 72."
    assert r.end.start == r.end.end == len(r.text)


def test_choice_answers_are_written_with_parentheses() -> None:
    from kpod.data.schema import Choice

    ex = make_example(
        qid="c",
        question="Pick one.",
        rationale="It is a bank.",
        answer="A",
        answer_kind="choice",
        choices=(Choice("A", "bank"), Choice("B", "tree")),
    )
    r = render_example(ex)
    assert r.text.endswith("Therefore, the answer is (A).")


def test_chat_style_uses_the_template_and_ends_with_the_turn_end(tiny_causal) -> None:
    tok = load_tokenizer(str(tiny_causal))
    fmt = PromptFormat(style="chat")
    prompt = render_prompt(EXAMPLE.question, fmt, tok)
    assert prompt.startswith("<|im_start|>user\n" + EXAMPLE.question)
    assert prompt.endswith("<|im_start|>assistant\nLet's think step by step.")
    r = render_example(EXAMPLE, fmt, tok)
    assert r.text.startswith(prompt)
    assert r.text[r.end.start : r.end.end] == "<|im_end|>"
    assert [r.text[s.start : s.end] for s in r.steps] == [s.text for s in EXAMPLE.steps]
    with pytest.raises(Exception, match="chat template"):
        render_prompt("q", fmt, None)


def test_token_segments_follow_offsets_not_strings() -> None:
    r = render_example(EXAMPLE)
    # Hand-made offsets: a zero-width BOS, then tokens covering prompt, a space+word, steps, answer.
    p_end = r.prompt.end
    s0, s1 = r.steps
    offsets = [
        (0, 0),  # BOS
        (0, 2),  # "Q:"
        (p_end - 1, p_end),  # "." of the trigger
        (p_end, s0.start + 7),  # " Natalia": leading space belongs to the step
        (s0.end - 1, s0.end),  # "."
        (s0.end, s1.start),  # "\n" between the steps -> the next step
        (s1.start, s1.end),
        (s1.end, r.answer.start + 9),  # " Therefore"
        (r.answer.end - 1, r.answer.end),
        (0, 0),  # EOS added by a tokenizer
    ]
    assert token_segments(offsets, r) == [PROMPT_SEGMENT, -1, -1, 0, 0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("style", ["paper", "chat"])
def test_tokenized_segments_rebuild_each_piece(tiny_causal, style: str) -> None:
    tok = load_tokenizer(str(tiny_causal))
    fmt = PromptFormat(style=style)
    r = render_example(EXAMPLE, fmt, tok)
    t = tokenize_rendered(r, tok, fmt)
    assert len(t.input_ids) == len(t.segments)
    for seg, span in enumerate([*r.steps, r.answer]):
        pieces = [tok.decode([i]) for i, s in zip(t.input_ids, t.segments, strict=True) if s == seg]
        assert "".join(pieces).strip() == r.text[span.start : span.end]
    assert t.segments == sorted(t.segments)  # pieces never interleave


def test_only_the_prompt_module_writes_the_template() -> None:
    """Training, scoring, teacher and evaluation must render prompts through kpod.prompt."""
    from pathlib import Path

    import kpod

    root = Path(kpod.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "prompt.py" and ('f"Q: ' in path.read_text() or "f'Q: " in path.read_text())
    ]
    assert offenders == []
