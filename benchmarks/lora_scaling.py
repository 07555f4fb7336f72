"""What does folding LoRA's scaling into B save a CPU training step? The bare step of the offline
student as the trainer runs it (LoRA r 16, alpha 32 on every linear layer, bf16 autocast with frozen
weights held in bf16, LoRA inputs uncast, eager attention, the loss from hidden states, AdamW), with
peft's forward (the adapter's output multiplied by alpha / r = 2) and with
:func:`kpod.models.lora_scaling_folded` (B's weight multiplied instead), alternating in one process
so that both see the same machine.

    .venv/bin/python benchmarks/lora_scaling.py                 # batch 4 x 224 tokens, bf16
    .venv/bin/python benchmarks/lora_scaling.py --precision fp32

Each round times ``--steps`` steps of each setting (the order reversed every other round) on one
fixed batch; the losses of the two settings' first steps must be equal (the fold is exact).
Results: results/lora-scaling.json (``-fp32`` before ``.json`` for fp32): tokens/s of every timed
step, the means and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    add_bare_step_options,
    alternating_rounds,
    bare_step,
    bare_step_student,
    provenance,
    random_training_batch,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bare_step_options(parser)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()

    import torch

    from kpod.models import (
        attention_implementation,
        frozen_linears_in,
        lora_input_casts_off,
        lora_scaling_folded,
    )

    torch.manual_seed(0)
    model, trainable = bare_step_student()
    bf16 = args.precision == "bf16"
    batch = random_training_batch(args.batch, args.width)

    def step(optimizer: torch.optim.Optimizer | None) -> tuple[float, float]:
        return bare_step(model, batch, bf16, optimizer)

    settings = {"peft": contextlib.nullcontext, "folded": lambda: lora_scaling_folded(model)}
    held = frozen_linears_in(model, torch.bfloat16) if bf16 else contextlib.nullcontext()
    with held, lora_input_casts_off(model), attention_implementation(model, "eager"):
        losses = {}
        for name, setting in settings.items():  # warm-up, and the same loss from the same weights
            with setting():
                step(None)
                losses[name] = step(None)[1]
        if losses["peft"] != losses["folded"]:
            raise SystemExit(f"the fold changed the loss: {losses}")
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-5)
        timed = alternating_rounds(settings, lambda: step(optimizer)[0], args.rounds, args.steps)
    mean = {name: round(sum(speeds) / len(speeds), 1) for name, speeds in timed.items()}
    result = {**provenance(), "batch": args.batch, "width": args.width, "precision": args.precision}
    result |= {"loss": losses["peft"], "tokens_per_s": timed, "mean_tokens_per_s": mean}
    result["folded_over_peft"] = round(mean["folded"] / mean["peft"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if bf16 else f"-{args.precision}"
    (RESULTS / f"lora-scaling{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(mean, result["folded_over_peft"])


if __name__ == "__main__":
    main()
