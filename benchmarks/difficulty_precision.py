"""Step difficulty scored in fp32 and in bf16 (``difficulty.precision``): the time, how far the
difficulties move, and what that does to the planned schedule.

    .venv/bin/python benchmarks/difficulty_precision.py                 # the quickstart's data
    .venv/bin/python benchmarks/difficulty_precision.py --config configs/quickstart.yaml --rounds 2

The config's training split (its data section, generated or read as `kpod run` does), scored by
the untrained student with uniform weights (the difficulties' token weights do not change the
forward passes' cost), at the config's ``difficulty.batch_size``, alternating fp32 and bf16 for
``--rounds`` rounds (each round scores every rationale in both). Agreement: Pearson's r over every
step's difficulty and the largest relative difference; then the schedule planned with the config's
schedule settings from each set (the same K-means clusters), and how many rationales' stage-by-stage
input steps ``c_i(t)`` differ.

Results: results/difficulty-precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, cpu_times, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "difficulty-precision.json")
    args = parser.parse_args()

    from kpod.data.loaders import load_examples
    from kpod.models import load_model
    from kpod.pipeline import data_step, load_pipeline_config
    from kpod.progressive.difficulty import cluster_questions, question_embeddings, score_difficulties
    from kpod.progressive.schedule import plan_schedule
    from kpod.weighting.weights import rationale_key

    config = load_pipeline_config(args.config)
    with tempfile.TemporaryDirectory() as folder:
        data_step(config.data, Path(folder))
        examples, _ = load_examples(Path(folder) / "train.jsonl")
    student = load_model(config.student.name, trainable=False)
    batch = config.difficulty.batch_size
    score_difficulties(examples[:batch], student, None, batch_size=batch, progress=False)  # warm-up
    score_difficulties(examples[:batch], student, None, batch_size=batch, progress=False, precision="bf16")
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    scores: dict[str, dict[str, list[float]]] = {}
    steal0, all0 = cpu_times()
    for _ in range(args.rounds):
        for precision in seconds:
            start = time.perf_counter()
            scores[precision] = score_difficulties(
                examples, student, None, batch_size=batch, progress=False, precision=precision
            )
            seconds[precision].append(time.perf_counter() - start)
    steal1, all1 = cpu_times()
    keys = [rationale_key(e) for e in examples]
    a = np.array([d for k in keys for d in scores["fp32"][k]])
    b = np.array([d for k in keys for d in scores["bf16"][k]])
    clusters = cluster_questions(
        question_embeddings([e.question for e in examples], student), config.schedule.n_clusters, seed=0
    ).tolist()
    plans = {p: plan_schedule([scores[p][k] for k in keys], clusters, config.schedule) for p in scores}
    changed = int(
        sum(not np.array_equal(x, y) for x, y in zip(plans["fp32"].c, plans["bf16"].c, strict=True))
    )
    tokens = sum(
        len(student.tokenizer(e.question + " " + e.rationale).input_ids) for e in examples
    )  # roughly what is scored, for a rate
    median = {p: statistics.median(v) for p, v in seconds.items()}
    result = {
        "what": "step difficulty of the config's training split, fp32 against bf16 scoring",
        "config": args.config,
        "rationales": len(examples),
        "steps": int(len(a)),
        "batch_size": batch,
        "seconds": {p: [round(x, 2) for x in v] for p, v in seconds.items()},
        "fp32_over_bf16_time": round(median["fp32"] / median["bf16"], 3),
        "approx_tokens": tokens,
        "pearson": round(float(np.corrcoef(a, b)[0, 1]), 5),
        "max_relative_difference": round(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-9))), 5),
        "mean_abs_difference": round(float(np.mean(np.abs(a - b))), 5),
        "mean_difficulty_fp32": round(float(a.mean()), 4),
        "schedule_rows_changed": changed,
        "schedule_advanced": {p: plan.advanced for p, plan in plans.items()},
        "steal_share": round((steal1 - steal0) / max(1, all1 - all0), 4),
        **provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=2))


if __name__ == "__main__":
    main()
