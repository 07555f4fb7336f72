"""The ``kpod`` command: one subcommand per pipeline stage.

Errors a user can fix (a bad file, record, config key or server) print one line,
``kpod: error: <where>: <what>``, and exit with code 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kpod import __version__
from kpod.errors import KpodError

DESCRIPTION = """\
KPOD: keypoint-based progressive chain-of-thought distillation (Feng et al., ICML 2024).

Distil the step-by-step reasoning of a teacher LLM into a small student: learn per-token
weights that single out keypoint tokens, then train the student on more and more of each
rationale, stage by stage.
"""


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise KpodError(f"--columns expects FIELD=COLUMN pairs separated by commas, got '{part}'")
        key, value = part.split("=", 1)
        mapping[key.strip()] = value.strip()
    return mapping


def _add_load_options(p: argparse.ArgumentParser) -> None:
    from kpod.data.loaders import FORMATS

    p.add_argument("path", help="data file (JSON, JSONL, CSV or XML)")
    p.add_argument("--format", choices=FORMATS, help="source format (default: detected from the file)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip records that cannot be read and report how many and why (default: stop at the first)",
    )
    p.add_argument(
        "--keep-calculator",
        action="store_true",
        help="GSM8K: keep calculator notes like <<48/2=24>> in the rationales (default: removed)",
    )
    p.add_argument(
        "--columns",
        help="generic format: FIELD=COLUMN pairs, e.g. question=q,answer=a,rationale=r",
    )


def _load(args: argparse.Namespace):
    from kpod.data.loaders import load_examples

    return load_examples(
        args.path,
        args.format,
        skip_invalid=args.skip_invalid,
        keep_calculator=args.keep_calculator,
        columns=_parse_columns(args.columns),
    )


def cmd_data_stats(args: argparse.Namespace) -> int:
    from kpod.data.stats import compute_stats, format_stats

    examples, report = _load(args)
    tokenizer = None
    if args.tokenizer:
        from kpod.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    stats = compute_stats(examples, report, tokenizer)
    print(json.dumps(stats, ensure_ascii=False) if args.json else format_stats(stats))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from kpod.data.synthetic import arithmetic_examples, gsm_symbolic_records
    from kpod.io import write_jsonl

    if args.kind == "arithmetic":
        rows = [e.to_dict() for e in arithmetic_examples(args.n, args.seed)]
    else:
        rows = [
            {"question": r["question"], "answer": r["answer"]}
            for r in gsm_symbolic_records(args.n, args.seed)
        ]
    write_jsonl(args.out, rows)
    fmt = "kpod" if args.kind == "arithmetic" else "gsm8k"
    print(f"wrote {len(rows)} {args.kind} problems to {args.out} (format: {fmt})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpod", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kpod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = sub.add_parser("data", help="read, check and generate reasoning data")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True

    stats = data_sub.add_parser(
        "stats",
        help="examples, questions, steps, token lengths and problems of a data file",
        description="Load a data file the way training will, and report what it holds and what is wrong "
        "with it: examples and questions, steps per rationale, token lengths, the share of gold "
        "answers the answer extractor can read back, and problems found.",
    )
    _add_load_options(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.add_argument(
        "--tokenizer",
        help="report token lengths with this tokenizer (hub id, local path, or smollm2-135m-instruct)",
    )
    stats.set_defaults(func=cmd_data_stats)

    synth = data_sub.add_parser(
        "synth",
        help="generate offline problems: arithmetic (with keypoints) or gsm-symbolic",
        description="arithmetic: our seeded multi-step word problems whose rationales mark the ground-truth "
        "keypoint tokens (kpod JSONL). gsm-symbolic: GSM8K-style problems from reasoning-gym, "
        "written as GSM8K JSONL.",
    )
    synth.add_argument("kind", choices=("arithmetic", "gsm-symbolic"))
    synth.add_argument("-n", type=int, default=1000, help="number of problems (default 1000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", type=Path, required=True, help="output JSONL file")
    synth.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KpodError as err:
        print(f"kpod: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kpod: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
