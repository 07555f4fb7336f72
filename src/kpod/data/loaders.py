"""Loaders for reasoning data sets, one per source format, all producing :class:`Example`.

Formats (``format=`` names; detected from the file when not given):

``gsm8k``
    JSONL with ``question`` and ``answer``; the answer is a step-by-step solution ending in
    ``#### N``. Calculator notes ``<<48/2=24>>`` are removed unless ``keep_calculator=True``.
    The same records from the Hugging Face hub with :func:`load_gsm8k_hub` (``openai/gsm8k``).
``teacher-json``
    Teacher rationales as released by MCC-KD/Mentor-KD: a JSON list (or JSONL) of
    ``{"input", "chain", "answer"}`` (``chain`` absent in test files), or the MCC-KD variant
    ``{"instruction", "output": [rationale, ...], "label"}``. Rationales of the same question share
    its qid.
``svamp``
    JSON list of ``{"Body", "Question", "Answer"}`` (question = Body + Question).
``asdiv-xml``
    The ASDiv corpus XML; ``<Answer>`` like ``"9 (apples)"``.
``csqa``
    CommonsenseQA JSONL, either the hub layout (``question``, ``choices: {label, text}``,
    ``answerKey``) or the original one (``question: {stem, choices: [{label, text}]}``).
``kpod``
    kpod's own JSONL (:meth:`Example.to_json`), e.g. teacher-store exports or synthetic data.
``generic``
    Any JSONL or CSV; ``columns`` maps kpod's fields (``question``, ``answer``, optionally
    ``rationale`` and ``qid``) to the file's column names.

Bad records raise :class:`DataError` naming file, line (or record) and field; with
``skip_invalid=True`` they are skipped and counted in the :class:`LoadReport` instead.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpod.data.answers import normalize_answer, split_answer_phrase
from kpod.data.schema import AnswerKind, Choice, Example
from kpod.data.steps import split_steps
from kpod.errors import DataError

FORMATS = ("gsm8k", "teacher-json", "svamp", "asdiv-xml", "csqa", "kpod", "generic")
CALCULATOR_NOTE_RE = re.compile(r"<<[^<>]*>>")
_SPLIT_NAMES = {"train", "test", "dev", "validation", "valid", "val"}


@dataclass
class LoadReport:
    """What a load read, and what it skipped and why (only with ``skip_invalid``)."""

    source: str
    n_records: int = 0
    n_examples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_fields: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.n_skipped:
            return f"{self.source}: {self.n_examples} examples from {self.n_records} records"
        reasons = "; ".join(f"{n} x {why}" for why, n in self.skipped.most_common())
        return f"{self.source}: {self.n_examples} examples, skipped {self.n_skipped} records ({reasons})"


@dataclass(frozen=True)
class _Record:
    """One raw record and where it is: ``where`` is "line" (1-based) or "record" (0-based)."""

    data: Any
    position: int
    where: str = "line"


class _Reader:
    """Turns raw records into examples, raising or counting :class:`DataError` per record."""

    def __init__(self, path: Path | str, source: str, skip_invalid: bool, report: LoadReport) -> None:
        self.path = str(path)
        self.source = source
        self.skip_invalid = skip_invalid
        self.report = report
        self._qids: dict[str, str] = {}

    def error(self, rec: _Record, message: str, field_name: str | None = None) -> DataError:
        return DataError(message, source=self.path, line=rec.position, field=field_name, where=rec.where)

    def qid_for(self, question: str, stem: str) -> str:
        """A stable qid per distinct question text: ``<stem>-<order of first appearance>``."""
        key = " ".join(question.split())
        if key not in self._qids:
            self._qids[key] = f"{stem}-{len(self._qids)}"
        return self._qids[key]

    def run(self, records: Iterator[_Record], convert: Callable[[_Record], list[Example]]) -> list[Example]:
        out: list[Example] = []
        for rec in records:
            self.report.n_records += 1
            try:
                out.extend(convert(rec))
            except DataError as err:
                if not self.skip_invalid:
                    raise
                self.report.skipped[err.reason if err.field is None else f"{err.field}: {err.reason}"] += 1
                self.report.skipped_fields[err.field or ""] += 1
                if len(self.report.first_errors) < 5:
                    self.report.first_errors.append(str(err))
        self.report.n_examples = len(out)
        return out

    def text_field(self, rec: _Record, name: str, *, required: bool = True) -> str | None:
        if not isinstance(rec.data, dict):
            raise self.error(rec, f"expected a JSON object, got {type(rec.data).__name__}")
        value = rec.data.get(name)
        if value is None:
            if required:
                raise self.error(rec, "missing field", name)
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise self.error(rec, f"expected a string, got {type(value).__name__}", name)
        if required and not value.strip():
            raise self.error(rec, "empty", name)
        return value


def make_example(
    *,
    qid: str,
    question: str,
    rationale: str | None,
    answer: str,
    answer_kind: AnswerKind = "number",
    choices: tuple[Choice, ...] = (),
    source: str = "",
    provenance: dict[str, Any] | None = None,
) -> Example:
    """Build an example: strip a trailing answer phrase from the rationale and split it into steps.

    ``answer`` must already be normalised. ``rationale=None`` makes an evaluation-only example.
    """
    text = ""
    steps: tuple = ()
    if rationale is not None:
        text, _ = split_answer_phrase(rationale)
        steps = split_steps(text)
    return Example(
        qid=qid,
        question=question.strip(),
        rationale=text,
        steps=steps,
        answer=answer,
        answer_kind=answer_kind,
        choices=choices,
        source=source,
        provenance=dict(provenance or {}),
    )


def _default_source(path: Path) -> str:
    """``data/gsm8k/train.jsonl`` -> ``gsm8k``; ``svamp.json`` -> ``svamp``."""
    return path.parent.name if path.stem.lower() in _SPLIT_NAMES and path.parent.name else path.stem


def _iter_jsonl(path: Path) -> Iterator[_Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _Record(json.loads(line), lineno, "line")
            except json.JSONDecodeError as err:
                raise DataError(
                    f"malformed JSON ({err.msg}, column {err.colno})", source=str(path), line=lineno
                ) from None


def _iter_json_list(path: Path) -> Iterator[_Record]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"malformed JSON ({err.msg}, column {err.colno})", source=str(path), line=err.lineno
        ) from None
    if isinstance(data, dict):
        # Some releases wrap the list: {"data": [...]} or {"train": [...]}.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a JSON list of records", source=str(path))
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", source=str(path))
    for i, item in enumerate(data):
        yield _Record(item, i, "record")


def _iter_records(path: Path) -> Iterator[_Record]:
    if path.suffix.lower() == ".jsonl":
        return _iter_jsonl(path)
    return _iter_json_list(path)


def _first_record(path: Path) -> Any:
    for rec in _iter_records(path):
        return rec.data
    raise DataError("no records", source=str(path))


def detect_format(path: str | Path) -> str:
    """Guess a file's format from its extension and the keys of its first record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return "asdiv-xml"
    if suffix in (".csv", ".tsv"):
        return "generic"
    if suffix not in (".json", ".jsonl"):
        raise DataError(
            f"cannot tell the format of a '{suffix or 'no extension'}' file; "
            f"pass --format, one of {', '.join(FORMATS)}",
            source=str(path),
        )
    first = _first_record(path)
    if not isinstance(first, dict):
        raise DataError("expected JSON objects as records", source=str(path), line=1)
    keys = set(first)
    if {"qid", "steps", "answer_kind"} <= keys:
        return "kpod"
    if "answerKey" in keys or "choices" in keys:
        return "csqa"
    if "instruction" in keys and ("output" in keys or "label" in keys):
        return "teacher-json"
    if "input" in keys and "answer" in keys:
        return "teacher-json"
    if "Body" in keys and "Answer" in keys:
        return "svamp"
    if "question" in keys and isinstance(first.get("answer"), str) and "####" in first["answer"]:
        return "gsm8k"
    if "question" in keys and "answer" in keys:
        return "generic"
    raise DataError(
        f"cannot tell the format from the keys {sorted(keys)}; pass --format, one of {', '.join(FORMATS)}",
        source=str(path),
    )


ANSWER_FIELDS = frozenset({"answer", "Answer", "label", "answerKey"})


def _gold(reader: _Reader, rec: _Record, raw: str, field_name: str, kind: AnswerKind = "number") -> str:
    answer = normalize_answer(raw, kind)
    if answer is None:
        raise reader.error(rec, f"cannot parse the answer {raw!r} as a {kind}", field_name)
    return answer


# --- GSM8K ------------------------------------------------------------------------------------


def gsm8k_record_to_example(
    reader: _Reader, rec: _Record, stem: str, keep_calculator: bool = False, index: int | None = None
) -> Example:
    """One GSM8K record (file or hub) to an example; ``index`` is its 0-based position in the split."""
    question = reader.text_field(rec, "question")
    solution = reader.text_field(rec, "answer")
    assert question is not None and solution is not None
    if "####" not in solution:
        raise reader.error(rec, "no final '#### <answer>' line", "answer")
    rationale, final = solution.rsplit("####", 1)
    answer = _gold(reader, rec, final, "answer")
    if not keep_calculator:
        rationale = CALCULATOR_NOTE_RE.sub("", rationale)
    if not rationale.strip():
        raise reader.error(rec, "empty rationale before '####'", "answer")
    pos = index if index is not None else rec.position
    return make_example(
        qid=f"{stem}-{pos}",
        question=question,
        rationale=rationale,
        answer=answer,
        source=reader.source,
        provenance={"file": reader.path, rec.where: rec.position, "index": pos},
    )


def _load_gsm8k(path: Path, reader: _Reader, keep_calculator: bool = False, **_: Any) -> list[Example]:
    stem = f"{reader.source}-{path.stem}" if path.stem != reader.source else reader.source
    index = itertools.count()  # 0-based record index, as the paper's split file counts them
    return reader.run(
        _iter_jsonl(path),
        lambda rec: [gsm8k_record_to_example(reader, rec, stem, keep_calculator, index=next(index))],
    )


def load_gsm8k_hub(
    split: str = "train",
    *,
    keep_calculator: bool = False,
    skip_invalid: bool = False,
    name: str = "openai/gsm8k",
    config: str = "main",
) -> tuple[list[Example], LoadReport]:
    """GSM8K from the Hugging Face hub (needs network or a populated datasets cache)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a dependency
        raise DataError("the 'datasets' package is needed to load from the hub") from err
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub client raises many types; all mean "not available"
        raise DataError(
            f"cannot load '{name}' ({config}, {split}) from the Hugging Face hub: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Offline? Download the JSONL and pass its path."
        ) from err
    source = "gsm8k"
    report = LoadReport(source=f"hub:{name}/{split}")
    reader = _Reader(f"hub:{name}/{split}", source, skip_invalid, report)
    stem = f"gsm8k-{split}"
    records = (_Record(dict(row), i, "record") for i, row in enumerate(ds))
    examples = reader.run(records, lambda rec: [gsm8k_record_to_example(reader, rec, stem, keep_calculator)])
    return examples, report


# --- teacher rationales (MCC-KD / Mentor-KD JSON) ------------------------------------------------


def _load_teacher_json(path: Path, reader: _Reader, **_: Any) -> list[Example]:
    stem = f"{reader.source}-{path.stem}" if path.stem != reader.source else reader.source

    def convert(rec: _Record) -> list[Example]:
        data = rec.data
        if not isinstance(data, dict):
            raise reader.error(rec, f"expected a JSON object, got {type(data).__name__}")
        if "instruction" in data:  # MCC-KD variant
            question = reader.text_field(rec, "instruction")
            answer = _gold(reader, rec, reader.text_field(rec, "label") or "", "label")
            outputs = data.get("output", [])
            if isinstance(outputs, str):
                outputs = [outputs]
            if not isinstance(outputs, list):
                raise reader.error(rec, "expected a list of rationales", "output")
            rationales: list[str | None] = []
            for j, out in enumerate(outputs):
                if not isinstance(out, str) or not out.strip():
                    raise reader.error(rec, f"rationale {j} is empty or not a string", "output")
                rationales.append(out)
            if not rationales:
                rationales = [None]
        else:
            question = reader.text_field(rec, "input")
            answer = _gold(reader, rec, reader.text_field(rec, "answer") or "", "answer")
            chain = reader.text_field(rec, "chain", required=False)
            if chain is not None and not chain.strip():
                raise reader.error(rec, "empty rationale", "chain")
            rationales = [chain]
        assert question is not None
        qid = reader.qid_for(question, stem)
        examples = []
        for j, rationale in enumerate(rationales):
            if rationale is not None and not split_answer_phrase(rationale)[0].strip():
                raise reader.error(rec, "rationale holds nothing but the answer phrase", "chain")
            prov: dict[str, Any] = {"file": reader.path, rec.where: rec.position}
            if len(rationales) > 1:
                prov["sample"] = j
            if isinstance(data.get("initial_correct"), bool):
                prov["initial_correct"] = data["initial_correct"]
            examples.append(
                make_example(
                    qid=qid,
                    question=question,
                    rationale=rationale,
                    answer=answer,
                    source=reader.source,
                    provenance=prov,
                )
            )
        return examples

    return reader.run(_iter_records(path), convert)


# --- SVAMP ----------------------------------------------------------------------------------------


def _load_svamp(path: Path, reader: _Reader, **_: Any) -> list[Example]:
    def convert(rec: _Record) -> list[Example]:
        body = reader.text_field(rec, "Body") or ""
        question = reader.text_field(rec, "Question") or ""
        answer = _gold(reader, rec, reader.text_field(rec, "Answer") or "", "Answer")
        ident = rec.data.get("ID", rec.position)
        full = body.strip()
        full = f"{full} {question.strip()}" if full else question.strip()
        return [
            make_example(
                qid=f"{reader.source}-{ident}",
                question=full,
                rationale=None,
                answer=answer,
                source=reader.source,
                provenance={"file": reader.path, rec.where: rec.position},
            )
        ]

    return reader.run(_iter_records(path), convert)


# --- ASDiv XML ------------------------------------------------------------------------------------


def _load_asdiv_xml(path: Path, reader: _Reader, **_: Any) -> list[Example]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"malformed XML ({err})", source=str(path), line=err.position[0]) from err
    problems = root.iter("Problem")

    def convert(rec: _Record) -> list[Example]:
        elem = rec.data
        ident = elem.get("ID") or str(rec.position)

        def text(tag: str) -> str:
            node = elem.find(tag)
            if node is None or not (node.text or "").strip():
                raise DataError(
                    f"missing <{tag}> in problem {ident}",
                    source=reader.path,
                    line=rec.position,
                    field=tag,
                    where="problem",
                )
            return node.text.strip()

        raw = text("Answer")
        answer = normalize_answer(raw, "number")
        if answer is None:
            raise DataError(
                f"cannot parse the answer {raw!r} of problem {ident} as a number",
                source=reader.path,
                line=rec.position,
                field="Answer",
                where="problem",
            )
        question = f"{text('Body')} {text('Question')}"
        return [
            make_example(
                qid=f"{reader.source}-{ident}",
                question=question,
                rationale=None,
                answer=answer,
                source=reader.source,
                provenance={"file": reader.path, "problem": ident},
            )
        ]

    return reader.run((_Record(p, i, "problem") for i, p in enumerate(problems)), convert)


# --- CommonsenseQA --------------------------------------------------------------------------------


def _load_csqa(path: Path, reader: _Reader, **_: Any) -> list[Example]:
    def convert(rec: _Record) -> list[Example]:
        data = rec.data
        if not isinstance(data, dict):
            raise reader.error(rec, f"expected a JSON object, got {type(data).__name__}")
        q = data.get("question")
        raw_choices = data.get("choices")
        if isinstance(q, dict):  # original layout
            stem, raw_choices = q.get("stem"), q.get("choices")
        else:
            stem = q
        if not isinstance(stem, str) or not stem.strip():
            raise reader.error(rec, "missing or empty question", "question")
        if isinstance(raw_choices, dict):
            labels, texts = raw_choices.get("label", []), raw_choices.get("text", [])
            pairs = list(zip(labels, texts, strict=False)) if len(labels) == len(texts) else []
        elif isinstance(raw_choices, list):
            pairs = [(c.get("label"), c.get("text")) for c in raw_choices if isinstance(c, dict)]
        else:
            pairs = []
        if not pairs or any(not isinstance(lab, str) or not isinstance(t, str) for lab, t in pairs):
            raise reader.error(rec, "expected choices with a label and a text each", "choices")
        choices = tuple(Choice(lab.strip().upper(), t.strip()) for lab, t in pairs)
        key = data.get("answerKey")
        answer = normalize_answer(key, "choice") if isinstance(key, str) else None
        if answer is None or answer not in {c.label for c in choices}:
            raise reader.error(rec, f"answer key {key!r} is not one of the choices", "answerKey")
        ident = data.get("id", rec.position)
        return [
            make_example(
                qid=f"{reader.source}-{ident}",
                question=stem,
                rationale=None,
                answer=answer,
                answer_kind="choice",
                choices=choices,
                source=reader.source,
                provenance={"file": reader.path, rec.where: rec.position},
            )
        ]

    return reader.run(_iter_records(path), convert)


# --- kpod's own JSONL -----------------------------------------------------------------------------


def _load_kpod(path: Path, reader: _Reader, **_: Any) -> list[Example]:
    def convert(rec: _Record) -> list[Example]:
        if not isinstance(rec.data, dict):
            raise reader.error(rec, "expected a JSON object")
        for key in ("qid", "question", "answer"):
            if key not in rec.data:
                raise reader.error(rec, "missing field", key)
        try:
            return [Example.from_dict(rec.data)]
        except (TypeError, ValueError, KeyError) as err:
            raise reader.error(rec, f"not a kpod example: {err}") from err

    return reader.run(_iter_records(path), convert)


# --- generic JSONL / CSV --------------------------------------------------------------------------


def _iter_csv(path: Path) -> Iterator[_Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter=delimiter)
        for row in rows:
            # line_num is the reader's physical line after the row (rows may span lines).
            yield _Record(row, rows.line_num, "line")


def _load_generic(
    path: Path,
    reader: _Reader,
    columns: dict[str, str] | None = None,
    answer_kind: AnswerKind = "number",
    **_: Any,
) -> list[Example]:
    cols = {"question": "question", "answer": "answer", "rationale": "rationale", "qid": "qid"}
    unknown = set(columns or {}) - set(cols)
    if unknown:
        raise DataError(
            f"unknown column mapping keys {sorted(unknown)}; allowed: {sorted(cols)}", source=str(path)
        )
    cols.update(columns or {})
    stem = f"{reader.source}-{path.stem}" if path.stem != reader.source else reader.source
    records = _iter_csv(path) if path.suffix.lower() in (".csv", ".tsv") else _iter_records(path)

    def convert(rec: _Record) -> list[Example]:
        question = reader.text_field(rec, cols["question"])
        answer = _gold(reader, rec, reader.text_field(rec, cols["answer"]) or "", cols["answer"], answer_kind)
        rationale = reader.text_field(rec, cols["rationale"], required=False)
        if rationale is not None and not rationale.strip():
            raise reader.error(rec, "empty rationale", cols["rationale"])
        assert question is not None
        ident = reader.text_field(rec, cols["qid"], required=False)
        qid = f"{stem}-{ident}" if ident else reader.qid_for(question, stem)
        return [
            make_example(
                qid=qid,
                question=question,
                rationale=rationale,
                answer=answer,
                answer_kind=answer_kind,
                source=reader.source,
                provenance={"file": reader.path, rec.where: rec.position},
            )
        ]

    return reader.run(records, convert)


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "gsm8k": _load_gsm8k,
    "teacher-json": _load_teacher_json,
    "svamp": _load_svamp,
    "asdiv-xml": _load_asdiv_xml,
    "csqa": _load_csqa,
    "kpod": _load_kpod,
    "generic": _load_generic,
}


def load_examples(
    path: str | Path,
    format: str | None = None,
    *,
    source: str | None = None,
    skip_invalid: bool = False,
    keep_calculator: bool = False,
    columns: dict[str, str] | None = None,
    answer_kind: AnswerKind = "number",
) -> tuple[list[Example], LoadReport]:
    """Load a reasoning data file as examples; see the module docstring for the formats.

    Args:
        path: the file.
        format: one of :data:`FORMATS`, or ``None`` to detect it.
        source: the data set's name in qids and ``Example.source`` (default: the folder name for
            ``train``/``test``-style file names, else the file stem).
        skip_invalid: skip bad records and count them in the report instead of raising.
        keep_calculator: GSM8K only: keep ``<<...>>`` calculator notes in the rationales.
        columns: ``generic`` only: kpod field -> column name.
        answer_kind: ``generic`` only: how to read the answer column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    fmt = format or detect_format(path)
    if fmt not in _LOADERS:
        raise DataError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}", source=str(path))
    src = source or _default_source(path)
    report = LoadReport(source=str(path))
    reader = _Reader(path, src, skip_invalid, report)
    examples = _LOADERS[fmt](
        path, reader, keep_calculator=keep_calculator, columns=columns, answer_kind=answer_kind
    )
    return examples, report
