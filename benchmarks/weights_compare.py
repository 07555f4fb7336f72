"""Two token-weighting runs' weights compared, token by token, on the rationales both weighed.

For a change that should move the learned weights only by rounding (e.g. session 26's questions
read once, whose answer losses differ from the former path's in bf16): the per-token Pearson
correlation and mean absolute difference of the two runs' ``weights.jsonl``, and each run's keypoint
contrast (mean w of digit/operator tokens minus that of the 50 most frequent words) and training
time, from the ``data/train.jsonl`` they were trained on.

    .venv/bin/python benchmarks/weights_compare.py RUN_A/weights RUN_B/weights RUN_A/data/train.jsonl

e.g. the ``weights`` folders of two ``make demo`` runs at two commits (``runs/quickstart/``).
Results: results/weights-compare.json (``--out`` to write elsewhere).
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
    parser.add_argument("a", type=Path, help="a weights folder (the reference)")
    parser.add_argument("b", type=Path, help="another weights folder")
    parser.add_argument("train", type=Path, help="the training file both were trained on")
    parser.add_argument("--out", type=Path, default=RESULTS / "weights-compare.json")
    args = parser.parse_args()

    import numpy as np

    from kpod.data.loaders import load_examples
    from kpod.weighting.evaluate import token_class_metrics
    from kpod.weighting.weights import load_weights

    examples = load_examples(args.train, "kpod")[0]
    runs = {"a": load_weights(args.a), "b": load_weights(args.b)}
    keys = sorted(set(runs["a"]) & set(runs["b"]))
    pairs = [(runs["a"][k].weights, runs["b"][k].weights) for k in keys]
    if any(len(x) != len(y) for x, y in pairs):
        raise SystemExit("the two runs weighed different tokens: not the same rationales or tokenizer")
    a = np.concatenate([x for x, _ in pairs])
    b = np.concatenate([y for _, y in pairs])
    result = {
        **provenance(),
        "a": str(args.a),
        "b": str(args.b),
        "rationales": len(keys),
        "tokens": int(a.size),
        "pearson": round(float(np.corrcoef(a, b)[0, 1]), 4),
        "mean_abs_difference": round(float(np.abs(a - b).mean()), 4),
        "max_abs_difference": round(float(np.abs(a - b).max()), 4),
    }
    for name, folder in (("a", args.a), ("b", args.b)):
        metrics = token_class_metrics(examples, runs[name])
        summary = json.loads((folder / "summary.json").read_text())
        result[f"{name}_contrast"] = metrics.get("contrast")
        result[f"{name}_train_seconds"] = summary.get("train_seconds")
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
