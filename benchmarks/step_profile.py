"""Where one training step's CPU time goes, by operator: ``torch.profiler`` over a forward and
backward of the offline student as the trainer runs it (LoRA r 16 on every linear layer, bf16
autocast or fp32 as ``precision: auto`` runs on a CPU without fast bf16 products, the step's weights
as the trainer holds them (``kpod.distill.trainer.training_step_weights``: frozen weights in bf16,
the LoRA scaling folded, the norms' casts shared; since session 38, frozen weights in bf16 only
before), the loss from hidden states), on one batch of random tokens.

    .venv/bin/python benchmarks/step_profile.py --length 100 --attention eager
    .venv/bin/python benchmarks/step_profile.py --length 32 --attention sdpa
    .venv/bin/python benchmarks/step_profile.py --length 100 --precision fp32

Batch 8 x ``--length`` tokens, the first 45 % of each row unlabelled (as a question is), random
token weights; two warm-up steps, then one profiled. Writes the operator table (self CPU time, top
30) to results/profiles/step-<attention>-L<length>.txt (``-fp32`` before ``.txt`` for fp32) with the
command, machine and PyTorch's CPU capability above it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, cpu_times, provenance, random_training_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="eager")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kpod.distill.loss import sequence_nll
    from kpod.distill.trainer import training_step_weights
    from kpod.models import StudentConfig, attention_implementation

    torch.manual_seed(0)
    student = StudentConfig()
    model = student.load().model
    n = args.length
    batch = random_training_batch(args.batch, n)

    bf16 = args.precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sequence_nll(model, batch, "causal", 0, 0, from_hidden=True)
        (loss / 1000).backward()
        model.zero_grad(set_to_none=True)

    with training_step_weights(model, args.precision, "cpu"), attention_implementation(model, args.attention):
        step()
        step()
        steal0, all0 = cpu_times()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        steal1, all1 = cpu_times()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    facts = provenance()
    header = "\n".join(
        [f"{k}: {facts[k]}" for k in ("date", "commit", "machine", "command")]
        + [f"cpu capability: {torch.backends.cpu.get_cpu_capability()}"]
        + [f"steal share: {(steal1 - steal0) / max(1, all1 - all0):.4f}", ""]
    )
    suffix = "" if bf16 else f"-{args.precision}"
    out = RESULTS / "profiles" / f"step-{args.attention}-L{n}{suffix}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)


if __name__ == "__main__":
    main()
