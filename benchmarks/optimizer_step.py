"""What the optimiser's step and the gradient clipping cost per training step, beside the step itself.

The trainer runs ``torch.optim.AdamW`` with PyTorch's default implementation on a CPU (a loop over the
parameters) and clips the gradient norm over the model's parameters. This times both on the
quickstart's trainable parameters (LoRA r 16 on every linear layer of the offline student: 420
tensors) with random gradients, beside AdamW's ``foreach`` and ``fused`` implementations, and says how
far the fused one's weights are from the loop's after the timed steps (the same maths; rounding
may differ). Compare with a training step's seconds (``benchmarks/throughput.py``'s rows: about
1,300 tokens a step at 190-390 tokens/s).

    .venv/bin/python benchmarks/optimizer_step.py [--steps 20 --rounds 2]

Results: results/optimizer-step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402


def step_ms(params: list, steps: int, **options) -> tuple[float, list]:
    """Milliseconds per ``AdamW.step()`` over ``params`` (after three untimed steps), and the
    parameters it ends with (the run starts from copies, so every implementation starts alike)."""
    import torch

    own = [p.detach().clone().requires_grad_(True) for p in params]
    for p, q in zip(own, params, strict=True):
        p.grad = q.grad.clone()
    optimizer = torch.optim.AdamW(own, lr=1e-3, **options)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3, own


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from kpod.pipeline import load_pipeline_config

    torch.manual_seed(0)
    config = load_pipeline_config(ROOT / "configs" / "quickstart.yaml")
    model = config.student.load().model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    implementations = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    rows = []
    for _ in range(args.rounds):
        row = {}
        for name, options in implementations.items():
            row[name], final = step_ms(params, args.steps, **options)
            if name == "loop":
                reference = final
            else:
                row[f"{name}_max_abs_diff"] = max(
                    float((a - b).abs().max()) for a, b in zip(final, reference, strict=True)
                )
        start = time.perf_counter()
        for _ in range(args.steps):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        row["clip_grad_norm"] = (time.perf_counter() - start) / args.steps * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        **provenance(),
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "unit": "ms per call",
        "rounds": rows,
    }
    (RESULTS / "optimizer-step.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
