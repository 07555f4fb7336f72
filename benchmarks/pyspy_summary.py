"""Where a training step's time goes, from a py-spy profile of the throughput benchmark.

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --rate 25 --native --format raw -o spy.txt -- \
        .venv/bin/python benchmarks/throughput.py --steps 3 --skip-trl --skip-eval --variants new --rounds 1
    .venv/bin/python benchmarks/pyspy_summary.py spy.txt

Prints, for the samples taken inside ``DistillRecipe.loss_step`` (one optimiser step), the share of
samples in which each frame appears (inclusive) and the frames most often on top (self).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def summarise(path: str, inside: str = "loss_step", top: int = 40) -> tuple[int, Counter, Counter]:
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = [re.sub(r" \(.*?\)$", "", f)[:100] for f in stack.split(";")]
            if not any(inside in f for f in frames):
                continue
            n = int(count)
            total += n
            for name in set(frames):
                inclusive[name] += n
            own[frames[-1]] += n
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", help="py-spy --format raw output")
    parser.add_argument("--inside", default="loss_step", help="count only samples under this frame")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    total, inclusive, own = summarise(args.profile, args.inside)
    print(f"{total} samples inside {args.inside}")
    print("--- inclusive")
    for name, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:5.1f}% {name}")
    print("--- self")
    for name, n in own.most_common(args.top // 2):
        print(f"{100 * n / total:5.1f}% {name}")


if __name__ == "__main__":
    main()
