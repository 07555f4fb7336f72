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

from common import RESULTS, bare_step, provenance, random_training_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each setting per round")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()

    import torch

    from kpod.models import (
        StudentConfig,
        attention_implementation,
        frozen_linears_in,
        lora_input_casts_off,
        lora_scaling_folded,
    )

    torch.manual_seed(0)
    model = StudentConfig().load().model
    trainable = [p for p in model.parameters() if p.requires_grad]
    for name, param in model.named_parameters():  # B starts at zero; a trained B is not
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
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
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        timed: dict[str, list[float]] = {name: [] for name in settings}
        for k in range(args.rounds):
            for name in list(settings) if k % 2 == 0 else list(settings)[::-1]:
                with settings[name]():
                    timed[name] += [step(optimizer)[0] for _ in range(args.steps)]
            print({name: speeds[-args.steps :] for name, speeds in timed.items()}, flush=True)
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
