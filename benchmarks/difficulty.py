"""Step-difficulty scoring throughput against the student's bare forward pass on the same batches;
target: scoring at >= 80 % of the bare forward's tokens/s.

    .venv/bin/python benchmarks/difficulty.py --n 96 --batch-size 8

Writes benchmarks/results/difficulty.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    started = provenance()  # the commit and time the run started from
    import torch

    from kpod.data.loaders import load_examples
    from kpod.models import load_model
    from kpod.progressive.difficulty import score_difficulties
    from kpod.prompt import render_example, tokenize_rendered

    examples, _ = load_examples(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    examples = examples[: args.n]
    student = load_model("smollm2-135m-instruct", trainable=False)
    tok = student.tokenizer
    seqs = sorted(
        (tokenize_rendered(render_example(e), tok).input_ids for e in examples), key=len, reverse=True
    )
    n_tokens = sum(len(s) for s in seqs)
    with torch.no_grad():  # warm-up
        student.model(input_ids=torch.tensor([seqs[-1]]))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), args.batch_size):
            batch = seqs[i : i + args.batch_size]
            longest = len(batch[0])
            ids = torch.full((len(batch), longest), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            student.model(input_ids=ids, attention_mask=mask)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    score_difficulties(examples, student, None, batch_size=args.batch_size, progress=False)
    scoring_s = time.perf_counter() - start
    result = {
        "benchmark": "difficulty",
        **started,
        "rationales": len(examples),
        "tokens": n_tokens,
        "forward_tokens_per_s": round(n_tokens / forward_s, 1),
        "scoring_tokens_per_s": round(n_tokens / scoring_s, 1),
        "scoring_over_forward": round(forward_s / scoring_s, 3),
        "target": 0.8,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "difficulty.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
