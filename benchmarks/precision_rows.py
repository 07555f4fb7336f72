"""What `auto` generation precision costs to measure, and whether 32 timed rows choose as 128 do.

`kpod.precision.choose` times greedy decoding in fp32 and in bf16 and keeps the faster; since
session 26 it times at most ``MAX_TIMED_ROWS`` (32) rows whatever the batch. This script times the
measurement itself (warm-up included, both precisions) at each row count given, on the untrained
offline student, and records the two rates, their ratio and which precision each row count
would choose.

    .venv/bin/python benchmarks/precision_rows.py                  # rows 32 128 32
    .venv/bin/python benchmarks/precision_rows.py --rows 16 32 128

Results: results/precision-rows.json (one row per row count, in the order run; the repeat of 32
shows how far the machine drifted meanwhile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, cpu_times, provenance  # noqa: E402

from kpod.models import DEFAULT_STUDENT, load_model  # noqa: E402
from kpod.precision import _cpu_name, bf16_copy, time_generation  # noqa: E402


def measure(model, rows: int, new_tokens: int, prompt_tokens: int) -> dict:
    """Both precisions' rates at ``rows`` and the wall seconds the two timings took."""
    steal0, all0 = cpu_times()
    start = time.perf_counter()
    fp32 = time_generation(model, rows, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
    low = bf16_copy(model)
    bf16 = time_generation(low, rows, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
    del low
    seconds = time.perf_counter() - start
    steal1, all1 = cpu_times()
    return {
        "rows": rows,
        "fp32_tokens_per_s": round(fp32, 1),
        "bf16_tokens_per_s": round(bf16, 1),
        "bf16_over_fp32": round(bf16 / fp32, 3),
        "choice": "bf16" if bf16 > fp32 else "fp32",
        "measurement_seconds": round(seconds, 1),
        "steal_share": round((steal1 - steal0) / max(1, all1 - all0), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default=DEFAULT_STUDENT)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128, 32])
    parser.add_argument("--new-tokens", type=int, default=32, help="timed tokens (kpod.precision's default)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="prompt length (kpod.precision's default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "precision-rows.json")
    args = parser.parse_args()
    started = provenance()
    model = load_model(args.student, trainable=False).model.eval()
    rows = []
    with torch.no_grad():
        for n in args.rows:
            row = measure(model, n, args.new_tokens, args.prompt_tokens)
            print(row, flush=True)
            rows.append(row)
    result = {
        **started,
        "cpu": _cpu_name(),
        "student": args.student,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
