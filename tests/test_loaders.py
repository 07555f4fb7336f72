import json
import re
from pathlib import Path

import pytest

from kpod.data.loaders import CALCULATOR_NOTE_RE, detect_format, load_examples, load_gsm8k_hub
from kpod.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


GSM = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. How much for 50 minutes?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "She earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 1,000",
    },
]


def test_gsm8k_removes_calculator_notes_by_default(tmp_path: Path) -> None:
    examples, report = load_examples(jsonl(tmp_path / "train.jsonl", GSM))
    assert report.n_examples == 2
    first = examples[0]
    assert first.answer == "72"
    assert "<<" not in first.rationale
    assert [s.text for s in first.steps] == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips.",
    ]
    assert examples[1].answer == "1000"
    assert examples[1].steps[0].text == "Weng earns 12/60 = $0.2 per minute."
    assert first.qid == f"{tmp_path.name}-train-0" or first.qid.endswith("-0")
    assert first.provenance["line"] == 1 and first.provenance["index"] == 0


def test_gsm8k_keeps_calculator_notes_on_request(tmp_path: Path) -> None:
    examples, _ = load_examples(jsonl(tmp_path / "train.jsonl", GSM), keep_calculator=True)
    assert CALCULATOR_NOTE_RE.search(examples[0].rationale)


def test_teacher_json_groups_rationales_by_question(tmp_path: Path) -> None:
    q1 = "Allan brought two balloons and Jake brought four. How many balloons?\n"
    rows = [
        {
            "input": q1,
            "chain": "Allan brought 2. Jake brought 4. So 2 + 4 = 6. Therefore, the answer is 6.",
            "answer": "6",
            "initial_correct": True,
        },
        {"input": q1, "chain": "2 + 4 = 6 balloons.", "answer": "6", "initial_correct": True},
        {"input": "What is 3 times 3?", "chain": "3 * 3 = 9.", "answer": "9"},
    ]
    path = write(tmp_path / "train.json", json.dumps(rows))
    examples, _ = load_examples(path)
    assert [e.qid for e in examples] == [examples[0].qid, examples[0].qid, examples[2].qid]
    assert examples[0].qid != examples[2].qid
    # The template phrase is not part of the rationale nor a step.
    assert examples[0].rationale == "Allan brought 2. Jake brought 4. So 2 + 4 = 6."
    assert [s.text for s in examples[0].steps][-1] == "So 2 + 4 = 6."
    assert examples[0].question == q1.strip()
    assert examples[0].provenance["initial_correct"] is True


def test_teacher_json_test_file_without_chains(tmp_path: Path) -> None:
    path = write(tmp_path / "test.json", json.dumps([{"input": "I see 115 cows. Legs?", "answer": "460"}]))
    (example,), _ = load_examples(path)
    assert example.rationale == "" and example.steps == () and example.answer == "460"


def test_mcc_kd_variant(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": "What is 2 + 2?",
            "output": ["2 + 2 = 4. Therefore, the answer is 4.", "Two and two make 4."],
            "label": "4",
        }
    ]
    path = write(tmp_path / "mcc.json", json.dumps(rows))
    assert detect_format(path) == "teacher-json"
    examples, _ = load_examples(path)
    assert len(examples) == 2 and {e.qid for e in examples} == {examples[0].qid}
    assert [e.provenance["sample"] for e in examples] == [0, 1]


def test_svamp(tmp_path: Path) -> None:
    rows = [
        {
            "ID": "chal-1",
            "Body": "Each pack has 5 bananas.",
            "Question": "How many in 3 packs?",
            "Equation": "( 5.0 * 3.0 )",
            "Answer": 15.0,
            "Type": "Multiplication",
        }
    ]
    path = write(tmp_path / "svamp.json", json.dumps(rows))
    assert detect_format(path) == "svamp"
    (example,), _ = load_examples(path)
    assert example.question == "Each pack has 5 bananas. How many in 3 packs?"
    assert example.answer == "15" and example.qid == "svamp-chal-1"


ASDIV_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Machine-Reading-Corpus-File>
<ProblemSet>
<Problem ID="nluds-0001" Grade="1" Source="http://example">
  <Body>Seven red apples and two green apples are in the basket.</Body>
  <Question>How many apples are in the basket?</Question>
  <Solution-Type>Addition</Solution-Type>
  <Answer>9 (apples)</Answer>
  <Formula>7+2=9</Formula>
</Problem>
<Problem ID="nluds-0002" Grade="1" Source="http://example">
  <Body>A ratio problem.</Body>
  <Question>What is the ratio?</Question>
  <Answer>2:3</Answer>
</Problem>
</ProblemSet>
</Machine-Reading-Corpus-File>
"""


def test_asdiv_xml(tmp_path: Path) -> None:
    path = write(tmp_path / "ASDiv.xml", ASDIV_XML)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "nluds-0002" in str(err.value) and "Answer" in str(err.value)
    examples, report = load_examples(path, skip_invalid=True)
    assert [e.answer for e in examples] == ["9"]
    assert examples[0].question.endswith("How many apples are in the basket?")
    assert report.n_skipped == 1


def test_csqa_both_layouts(tmp_path: Path) -> None:
    hub = {
        "id": "q1",
        "question": "Where do you borrow books?",
        "question_concept": "books",
        "choices": {"label": ["A", "B", "C"], "text": ["bank", "library", "mall"]},
        "answerKey": "B",
    }
    orig = {
        "id": "q2",
        "answerKey": "A",
        "question": {
            "stem": "Where is money kept?",
            "choices": [{"label": "A", "text": "bank"}, {"label": "B", "text": "tree"}],
        },
    }
    path = jsonl(tmp_path / "csqa.jsonl", [hub, orig])
    assert detect_format(path) == "csqa"
    examples, _ = load_examples(path)
    assert [e.answer for e in examples] == ["B", "A"]
    assert examples[0].answer_kind == "choice" and examples[0].choices[1].text == "library"
    bad = jsonl(tmp_path / "bad.jsonl", [dict(hub, answerKey="F")])
    with pytest.raises(DataError, match="line 1, field 'answerKey'"):
        load_examples(bad)


def test_generic_csv_and_jsonl_with_column_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.csv", 'q,a,why\n"What is 2+3?",5,"2 + 3 = 5."\n"What is 1+1?",2,\n')
    with pytest.raises(DataError, match=r"mine.csv, line 3, field 'why': empty rationale"):
        load_examples(path, columns={"question": "q", "answer": "a", "rationale": "why"})
    examples, _ = load_examples(path, columns={"question": "q", "answer": "a"})
    assert [e.answer for e in examples] == ["5", "2"] and not examples[0].has_rationale
    path = jsonl(tmp_path / "mine.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    (example,), _ = load_examples(path, format="generic", answer_kind="text")
    assert example.answer == "paris" and example.answer_kind == "text"
    with pytest.raises(DataError, match="unknown column mapping keys"):
        load_examples(path, format="generic", columns={"explanation": "x"})


def test_kpod_format_round_trips(tmp_path: Path) -> None:
    examples, _ = load_examples(jsonl(tmp_path / "train.jsonl", GSM))
    out = jsonl(tmp_path / "examples.jsonl", [e.to_dict() for e in examples])
    assert detect_format(out) == "kpod"
    again, _ = load_examples(out)
    assert again == examples


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"question": "q2", "answer": \n',
            "line 2: malformed JSON",
        ),
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"answer": "y\\n#### 3"}\n',
            "line 2, field 'question': missing",
        ),
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"question": "  ", "answer": "y\\n#### 3"}\n',
            "line 2, field 'question': empty",
        ),
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"question": "q2", "answer": "#### 3"}\n',
            "line 2, field 'answer': empty rationale",
        ),
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"question": "q2", "answer": "y\\n#### lots"}\n',
            "line 2, field 'answer': cannot parse the answer",
        ),
        (
            '{"question": "q", "answer": "x\\n#### 5"}\n{"question": "q2", "answer": "no final line"}\n',
            "line 2, field 'answer': no final",
        ),
    ],
)
def test_bad_gsm8k_records_name_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path / "train.jsonl", content)
    with pytest.raises(DataError) as err:
        load_examples(path, format="gsm8k")
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_skip_invalid_counts_every_skipped_record(tmp_path: Path) -> None:
    rows = [
        GSM[0],
        {"question": "q"},
        {"question": "q2", "answer": "a\n#### x"},
        {"question": "q3", "answer": "a\n#### x"},
    ]
    path = jsonl(tmp_path / "train.jsonl", rows)
    examples, report = load_examples(path, format="gsm8k", skip_invalid=True)
    assert len(examples) == 1
    assert report.n_records == 4 and report.n_skipped == 3
    assert report.skipped["answer: missing field"] == 1
    assert sum(n for why, n in report.skipped.items() if "cannot parse" in why) == 2
    assert "skipped 3 records" in report.summary()


def test_teacher_json_errors_use_record_indices(tmp_path: Path) -> None:
    rows = [
        {"input": "q", "chain": "1 + 1 = 2.", "answer": "2"},
        {"input": "q2", "chain": " ", "answer": "3"},
    ]
    path = write(tmp_path / "train.json", json.dumps(rows))
    with pytest.raises(DataError, match=r"record 1, field 'chain': empty rationale"):
        load_examples(path)
    path = write(tmp_path / "broken.json", '[{"input": "q",\n "answer": }]')
    with pytest.raises(DataError, match=r"broken.json, line 2: malformed JSON"):
        load_examples(path)


def test_undetectable_files_ask_for_a_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass --format"):
        load_examples(write(tmp_path / "data.txt", "hello"))
    with pytest.raises(DataError, match="pass --format"):
        load_examples(jsonl(tmp_path / "odd.jsonl", [{"x": 1}]))
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_hub_loader_converts_hub_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub path runs the same conversion; the hub itself is replaced by a local dataset."""
    import datasets

    local = jsonl(tmp_path / "rows.jsonl", GSM)
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return real_load_dataset("json", data_files=str(local), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, report = load_gsm8k_hub("test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [e.answer for e in examples] == ["72", "1000"]
    assert [e.provenance["index"] for e in examples] == [0, 1]
    assert examples[0].qid == "gsm8k-test-0" and report.n_examples == 2


def test_hub_loader_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="Offline\\? Download the JSONL"):
        load_gsm8k_hub("train")


def test_shared_gsm8k_and_asdiv_load_completely(shared_data: Path) -> None:
    from kpod.data.stats import answer_round_trips

    for name, n, n_questions in [
        ("gsm8k/train.jsonl", 7473, 7473),
        ("gsm8k/test.jsonl", 1319, 1319),
        ("asdiv-gpt35/train.json", 4269, 1422),
        ("asdiv-gpt35/test.json", 314, 314),
    ]:
        examples, report = load_examples(shared_data / name)
        assert report.n_examples == n and report.n_skipped == 0
        assert len({e.qid for e in examples}) == n_questions
        assert all(answer_round_trips(e) for e in examples)
    train, _ = load_examples(shared_data / "asdiv-gpt35/train.json")
    assert all(e.steps for e in train)
    # The template phrase ends rationales in the data; it is never kept as their last step.
    template = re.compile(r"^(therefore,?\s*)?the answer is\s*\S+$", re.IGNORECASE)
    assert not any(template.match(e.steps[-1].text) for e in train)
