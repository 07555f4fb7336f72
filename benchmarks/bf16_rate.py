"""Whether this CPU has fast bf16 matrix products, and what ``precision: auto`` chooses here.

Measures one thread's fp32 and bf16 matrix-product rate on SmolLM2-135M's MLP shape (1024 tokens x
576 -> 1536), prints PyTorch's CPU capability and oneDNN's bf16 check
(:func:`kpod.precision.cpu_has_fast_bf16`) and what ``auto`` resolves to
(:func:`kpod.precision.compute_precision`). With ``--weighting-steps N`` it also times N token
weighting steps (after a first, untimed) of the offline student in fp32 and in bf16 (the
quickstart's settings, on generated arithmetic problems), where a slow bf16 product showed first.

    .venv/bin/python benchmarks/bf16_rate.py [--weighting-steps 1]

Results: results/bf16-rate.json (one entry per CPU model, replaced when measured again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def matmul_gflops(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, rounds: int = 3) -> float:
    """One thread's rate of an [m, k] x [k, n] product in ``dtype`` (best of ``rounds``, after a
    warm-up: oneDNN builds its kernel on first use)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def weighting_seconds(precision: str, steps: int) -> float:
    """Seconds per token-weighting step of the offline student in ``precision``: ``steps`` steps
    timed after a first one (which also pays the model's load and first-use costs)."""
    from kpod.data.synthetic import arithmetic_examples
    from kpod.pipeline import load_pipeline_config
    from kpod.weighting.train import train_weighting

    config = load_pipeline_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    weighting = dataclasses.replace(config.weighting, max_steps=steps + 1, precision=precision)
    stamps: list[float] = []
    examples = arithmetic_examples(weighting.batch_size * (steps + 1), seed=0)
    stamp = lambda *_: stamps.append(time.perf_counter())  # noqa: E731
    train_weighting(examples, weighting, progress=False, on_step=stamp)
    return (stamps[-1] - stamps[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weighting-steps", type=int, default=0)
    args = parser.parse_args()
    from kpod.precision import _cpu_name, compute_precision, cpu_has_fast_bf16

    torch.set_num_threads(1)
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    entry = {
        **provenance(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "auto_resolves_to": compute_precision("auto", "cpu"),
        "matmul_gflop_per_s_one_thread": {"fp32": round(fp32, 1), "bf16": round(bf16, 2)},
        "bf16_over_fp32": round(bf16 / fp32, 3),
    }
    if args.weighting_steps:
        entry["weighting_seconds_per_step"] = {
            p: round(weighting_seconds(p, args.weighting_steps), 1) for p in ("fp32", "bf16")
        }
    print(json.dumps(entry, indent=1))
    path = RESULTS / "bf16-rate.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known[_cpu_name()] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=1) + "\n")


if __name__ == "__main__":
    main()
