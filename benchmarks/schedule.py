"""Time to plan a whole schedule (Algorithm 1) for many questions; target < 10 s for 100,000
questions and 20 stages.

    .venv/bin/python benchmarks/schedule.py --questions 100000 --stages 20

Writes benchmarks/results/schedule.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=100_000)
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = provenance()  # the commit and time the run started from
    from kpod.progressive.schedule import ScheduleConfig, plan_schedule

    rng = np.random.default_rng(args.seed)
    # GSM8K-like: 2 to 8 steps, per-step difficulty (weighted mean NLL) around 0.5-3 nats.
    diffs = [rng.gamma(2.0, 0.6, int(rng.integers(2, 9))) for _ in range(args.questions)]
    clusters = rng.integers(0, 5, args.questions).tolist()
    start = time.perf_counter()
    sched = plan_schedule(diffs, clusters, ScheduleConfig(stages=args.stages))
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "schedule",
        **started,
        "questions": args.questions,
        "stages": args.stages,
        "seconds": round(seconds, 2),
        "target_seconds": 10,
        "advanced_per_stage": sched.advanced,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "schedule.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
