"""Two ways of greedy generation on one student and one test file: seconds of each, alternated
(A, B, A, B) so that a drift of the machine's speed falls on both, and how many texts and answers
differ. Every arm but ``refill``'s B runs kpod's decoding loop as it was in session 12, when these
comparisons were first made: each batch on its own, with transformers' ``DynamicCache``.

``--compare compact`` (default): ``model.generate`` (A) against finished sequences dropped from the
batch (B, kpod.evaluate's default for causal students).
``--compare merge``: bf16 generation of a LoRA student with its adapters kept as separate layers
(A, a plain bf16 copy) against merged into the weights (B, kpod.precision.bf16_copy), both with
the compacting loop.
``--compare batch``: the compacting loop at ``--batch-size`` (A) against ``--batch-b`` (B), both
bf16 with merged adapters (decoding a 135M model on a CPU streams every weight from memory once per
step, so a step's time grows much more slowly than its batch).
``--compare refill``: session 12's loop at ``--batch-size`` (A: each batch on its own, with
transformers' ``DynamicCache``) against today's default at ``--batch-b`` (B: the batch refilled from
chunks of ``kpod.evaluate.REFILL_BATCHES`` batches, kpod's growing cache).

    .venv/bin/python benchmarks/generation_compact.py STUDENT_DIR TEST_FILE --n 128 [--compare merge]

Writes ``results/generation-<compare>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


@contextlib.contextmanager
def _loop(today: bool):
    """kpod.evaluate's decoding loop as it is (``today``), or as in session 12, which every arm but
    ``refill``'s B measures: each batch decoded on its own (chunks of one batch, no refilling) with
    transformers' ``DynamicCache``."""
    import kpod.evaluate as kpod_evaluate
    import kpod.kv_cache as kv_cache

    saved = kpod_evaluate.REFILL_BATCHES, kv_cache.growing_cache
    if not today:
        from transformers import DynamicCache

        kpod_evaluate.REFILL_BATCHES = 1
        kv_cache.growing_cache = lambda model: DynamicCache()
    try:
        yield
    finally:
        kpod_evaluate.REFILL_BATCHES, kv_cache.growing_cache = saved


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
    parser.add_argument("--compare", choices=("compact", "merge", "batch", "refill"), default="compact")
    parser.add_argument("--batch-b", type=int, default=128, help="B's batch size (batch, refill)")
    args = parser.parse_args()
    started = provenance()

    from kpod.data.loaders import load_examples
    from kpod.evaluate import evaluate
    from kpod.models import load_model

    loaded = load_model(args.student, trainable=False)
    questions = load_examples(args.test_file)[0][: args.n]
    names = {
        "compact": ("generate", "compact"),
        "merge": ("adapters", "merged"),
        "batch": (f"batch{args.batch_size}", f"batch{args.batch_b}"),
        "refill": (f"batch{args.batch_size}", f"batch{args.batch_b}-refill"),
    }[args.compare]
    if args.compare in ("batch", "refill"):
        settings = {
            names[0]: (loaded.model, {"precision": args.precision}),
            names[1]: (loaded.model, {"precision": args.precision, "batch_size": args.batch_b}),
        }
    elif args.compare == "merge":
        import copy

        import torch

        # A bf16 copy with the adapters kept: evaluate() generates with a bf16 model as it is.
        unmerged = copy.deepcopy(loaded.model).to(torch.bfloat16).eval()
        settings = {
            "adapters": (unmerged, {"precision": "fp32"}),
            "merged": (loaded.model, {"precision": "bf16"}),
        }
    else:
        settings = {
            "generate": (loaded.model, {"precision": args.precision, "compact": False}),
            "compact": (loaded.model, {"precision": args.precision, "compact": True}),
        }
    runs: dict[str, list] = {name: [] for name in names}
    for name in (*names, *names):
        model, options = settings[name]
        with _loop(today=args.compare == "refill" and name == names[1]):
            result = evaluate(
                model,
                loaded.tokenizer,
                questions,
                **{"batch_size": args.batch_size, **options},
                max_new_tokens=args.max_new_tokens,
                progress=False,
            )
        runs[name].append(result)
        print(name, round(result.seconds, 1), result.precision, flush=True)
    a, b = runs[names[0]][0].predictions, runs[names[1]][0].predictions
    out = {
        **started,
        "student": args.student,
        "test_file": str(args.test_file),
        "questions": len(questions),
        "batch_size": args.batch_size,
        **({"batch_b": args.batch_b} if args.compare in ("batch", "refill") else {}),
        "precision": args.precision,
        "seconds": {k: [round(r.seconds, 1) for r in v] for k, v in runs.items()},
        "generated_tokens": runs[names[1]][0].generated_tokens,
        "texts_differ": sum(x["generated"] != y["generated"] for x, y in zip(a, b, strict=True)),
        "answers_differ": sum(x["predicted"] != y["predicted"] for x, y in zip(a, b, strict=True)),
    }
    out["compare"] = args.compare
    out["speedup"] = round(sum(out["seconds"][names[0]]) / sum(out["seconds"][names[1]]), 3)
    out["accuracy"] = {name: round(100 * runs[name][0].accuracy, 2) for name in names}
    path = RESULTS / f"generation-{args.compare}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("speedup", "texts_differ", "answers_differ", "accuracy")}))


if __name__ == "__main__":
    main()
