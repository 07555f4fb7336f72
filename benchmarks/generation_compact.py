"""Greedy generation with finished sequences dropped from the batch (kpod.evaluate's default for
causal students) against ``model.generate``, on one student and one test file: seconds of each,
alternated (generate, compact, generate, compact) so that a drift of the machine's speed falls on
both, and how many texts and answers differ.

    .venv/bin/python benchmarks/generation_compact.py STUDENT_DIR TEST_FILE --n 128

Writes ``results/generation-compact.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("student")
    parser.add_argument("test_file", type=Path)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    started = provenance()

    from kpod.data.loaders import load_examples
    from kpod.evaluate import evaluate
    from kpod.models import load_model

    loaded = load_model(args.student, trainable=False)
    questions = load_examples(args.test_file)[0][: args.n]
    runs: dict[str, list] = {"generate": [], "compact": []}
    for compact in (False, True, False, True):
        result = evaluate(
            loaded.model,
            loaded.tokenizer,
            questions,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=False,
            precision=args.precision,
            compact=compact,
        )
        runs["compact" if compact else "generate"].append(result)
        print("compact" if compact else "generate", round(result.seconds, 1), flush=True)
    a, b = runs["generate"][0].predictions, runs["compact"][0].predictions
    out = {
        **started,
        "student": args.student,
        "test_file": str(args.test_file),
        "questions": len(questions),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "seconds": {k: [round(r.seconds, 1) for r in v] for k, v in runs.items()},
        "generated_tokens": runs["compact"][0].generated_tokens,
        "texts_differ": sum(x["generated"] != y["generated"] for x, y in zip(a, b, strict=True)),
        "answers_differ": sum(x["predicted"] != y["predicted"] for x, y in zip(a, b, strict=True)),
    }
    out["compact_speedup"] = round(sum(out["seconds"]["generate"]) / sum(out["seconds"]["compact"]), 3)
    path = RESULTS / "generation-compact.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("compact_speedup", "texts_differ", "answers_differ")}))


if __name__ == "__main__":
    main()
