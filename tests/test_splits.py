from pathlib import Path

import pytest

from kpod.data.loaders import load_examples, make_example
from kpod.data.splits import carve_dev, gsm8k_paper_split, split_by_question
from kpod.errors import DataError


def examples(n_questions: int, per_question: int = 3):
    return [
        make_example(qid=f"q{i}", question=f"question {i}", rationale=f"step {j}.", answer=str(i))
        for i in range(n_questions)
        for j in range(per_question)
    ]


def test_split_by_question_keeps_rationales_together() -> None:
    data = examples(50)
    parts = split_by_question(data, {"train": 0.6, "dev": 10, "test": -1}, seed=3)
    ids = {name: {e.qid for e in part} for name, part in parts.items()}
    assert [len(ids[p]) for p in ("train", "dev", "test")] == [30, 10, 10]
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert all(len(part) == 3 * len(ids[name]) for name, part in parts.items())


def test_split_is_seeded_and_stable_under_added_questions() -> None:
    a = split_by_question(examples(40), {"dev": 0.25, "train": -1}, seed=1)
    b = split_by_question(examples(40), {"dev": 0.25, "train": -1}, seed=1)
    c = split_by_question(examples(40), {"dev": 0.25, "train": -1}, seed=2)
    assert a == b and a != c
    train, dev = carve_dev(examples(40), 10, seed=1)
    assert {e.qid for e in dev} == {e.qid for e in a["dev"]}
    with pytest.raises(DataError):
        split_by_question(examples(5), {"dev": 10}, seed=0)


def test_gsm8k_paper_split(shared_data: Path) -> None:
    test, _ = load_examples(shared_data / "gsm8k/test.jsonl")
    dev = gsm8k_paper_split(test, "dev")
    held_out = gsm8k_paper_split(test, "test")
    assert (len(dev), len(held_out)) == (660, 659)
    assert not {e.qid for e in dev} & {e.qid for e in held_out}
    with pytest.raises(DataError, match="only 5 match"):
        gsm8k_paper_split(test[:10], "test", shared_data / "gsm8k/paper_split.json")
