"""Do new batch shapes cost a CPU training step anything? The bare step of the offline student as the
trainer runs it (LoRA r 16 on every linear layer, bf16 autocast with frozen weights held in bf16,
LoRA inputs uncast, eager attention, the loss from hidden states, AdamW), timed per step: a fixed
shape repeated, then batches of widths never seen before, then the same widths again. If building
oneDNN's kernels for a new shape cost much, the new widths would run slower than the repeats.

    .venv/bin/python benchmarks/shape_reuse.py              # batch 4, widths around 210 tokens
    .venv/bin/python benchmarks/shape_reuse.py --precision fp32

Results: results/shape-reuse.json (tokens/s of every timed step, by phase and round).
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
    parser.add_argument("--width", type=int, default=224, help="the fixed shape's length")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()

    import torch

    from kpod.models import StudentConfig, attention_implementation, frozen_linears_in, lora_input_casts_off

    torch.manual_seed(0)
    model = StudentConfig().load().model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    bf16 = args.precision == "bf16"

    def tokens_per_s(data: dict) -> float:
        return bare_step(model, data, bf16, optimizer)[0]

    widths = [args.width - 23, args.width - 15, args.width - 7, args.width + 1]
    widths += [args.width - 11, args.width - 19, args.width - 3, args.width - 27]
    rounds = []
    held = frozen_linears_in(model, torch.bfloat16) if bf16 else contextlib.nullcontext()
    with held, lora_input_casts_off(model), attention_implementation(model, "eager"):
        fixed = random_training_batch(args.batch, args.width)
        tokens_per_s(fixed), tokens_per_s(fixed)  # warm-up
        for k in range(args.rounds):
            # widths shifted each round: never seen before
            new = [random_training_batch(args.batch, w + k) for w in widths]
            row = {"fixed": [tokens_per_s(fixed) for _ in range(4)]}
            row["new_widths"] = [tokens_per_s(b) for b in new]
            row["same_widths_again"] = [tokens_per_s(b) for b in new]
            print(row, flush=True)
            rounds.append(row)
    mean = {key: round(sum(sum(r[key]) / len(r[key]) for r in rounds) / len(rounds), 1) for key in rounds[0]}
    result = {**provenance(), "batch": args.batch, "width": args.width, "precision": args.precision}
    result |= {"rounds": rounds, "mean_tokens_per_s": mean}
    (RESULTS / "shape-reuse.json").write_text(json.dumps(result, indent=2) + "\n")
    print(mean)


if __name__ == "__main__":
    main()
