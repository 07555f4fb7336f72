"""The output projection of the last positions, as transformers computes it for ``logits_to_keep``:
a count (the hidden states sliced, a strided view) against indices (a contiguous copy), for a
frozen vocabulary matrix the size of SmolLM2's (49,152 x 576), in bf16 and fp32.

    .venv/bin/python benchmarks/logits_to_keep.py        # -> results/logits-to-keep.json

With a frozen weight PyTorch cannot fold the strided view into one matrix product: it expands the
weight once per sequence, copies it and runs a batched product. The weighting predictor (16
sequences, the answer's last positions) and the generation prefill (32 sequences, the last
position) both asked for logits that way until ``kpod.models.last_positions``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def main() -> None:
    import torch

    started = provenance()
    out: dict = {}
    for dtype in (torch.bfloat16, torch.float32):
        head = torch.nn.Linear(576, 49152, bias=False).to(dtype).requires_grad_(False)
        for batch, length, keep in ((16, 120, 5), (32, 100, 1)):
            hidden = torch.randn(batch, length, 576, dtype=dtype)
            index = torch.arange(length - keep, length)
            row = {}
            with torch.no_grad():
                for name, fn in (
                    ("count", lambda h=hidden, k=keep, p=head: p(h[:, -k:, :])),
                    ("indices", lambda h=hidden, i=index, p=head: p(h[:, i, :])),
                ):
                    fn()
                    start = time.perf_counter()
                    for _ in range(3):
                        fn()
                    row[f"{name}_ms"] = round((time.perf_counter() - start) / 3 * 1000, 1)
                diff = (head(hidden[:, -keep:, :]).float() - head(hidden[:, index, :]).float()).abs().max()
            row["speedup"] = round(row["count_ms"] / row["indices_ms"], 1)
            row["max_abs_difference"] = float(diff)
            name = f"{str(dtype).split('.')[-1]}-{batch}x{keep}-of-{length}"
            out[name] = row
            print(name, row, flush=True)
    path = RESULTS / "logits-to-keep.json"
    path.write_text(json.dumps({**started, **out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
