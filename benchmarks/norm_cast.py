"""Casting the RMS norms' outputs to bf16 once in training steps: what it pays, and what it changes.

Under bf16 autocast each projection that reads a norm's output (q, k and v after the first norm,
gate and up after the second; in each, peft's base layer and LoRA's A) casts that float32 output
to bf16 itself. Two ways of casting it once are compared with that, alternating in one process:

- ``shared`` (the trainer's since session 38, :func:`kpod.models.norm_casts_shared`): one cast,
  read by every projection through a function whose backward casts each reader's gradient back to
  float32, so the gradients add up in float32 as before;
- ``cast once`` (measured in session 37, not adopted): the norm's output itself cast to bf16, so
  the readers' gradients add up in bf16 before one cast back.

It times the bare step of the offline student as the trainer runs it (LoRA r 16, alpha 32 on every
linear layer, frozen weights held in bf16, LoRA inputs uncast, the scaling folded, eager attention,
the loss from hidden states, AdamW) and reports how far each moves the LoRA gradients of one batch
(largest difference over the largest gradient, per tensor, then the worst tensor).

    .venv/bin/python benchmarks/norm_cast.py            # batch 4 x 224 tokens

Results: results/norm-cast.json.
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
    args = parser.parse_args()

    import torch

    from kpod.distill.loss import sequence_nll
    from kpod.distill.trainer import training_step_weights
    from kpod.models import attention_implementation, decoder_layer_norms, inner_model, norm_casts_shared

    torch.manual_seed(0)
    model, trainable = bare_step_student()
    batch = random_training_batch(args.batch, args.width)
    norms = decoder_layer_norms(inner_model(model))

    @contextlib.contextmanager
    def cast_once():
        handles = [n.register_forward_hook(lambda m, a, out: out.to(torch.bfloat16)) for n in norms]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gradients() -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sequence_nll(model, batch, "causal", 0, 0, from_hidden=True)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainable.items()}
        model.zero_grad(set_to_none=True)
        return grads

    settings = {
        "per-reader casts": contextlib.nullcontext,
        "shared": lambda: norm_casts_shared(model, torch.bfloat16),
        "cast once": cast_once,
    }
    step_weights = training_step_weights(model, "bf16", "cpu", share_norm_casts=False)  # settings below
    with step_weights, attention_implementation(model, "eager"):
        grads, losses = {}, {}
        for name, setting in settings.items():
            with setting():
                bare_step(model, batch, True)  # warm-up
                losses[name] = bare_step(model, batch, True)[1]
                grads[name] = gradients()
        moved = {
            name: max(
                float((grads[name][k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                for k, g in grads["per-reader casts"].items()
            )
            for name in ("shared", "cast once")
        }
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-5)
        step = lambda: bare_step(model, batch, True, optimizer)[0]  # noqa: E731
        timed = alternating_rounds(settings, step, args.rounds, args.steps)
    mean = {name: round(sum(speeds) / len(speeds), 1) for name, speeds in timed.items()}
    result = {**provenance(), "batch": args.batch, "width": args.width, "norms": len(norms)}
    result |= {"loss": losses, "gradient_moved": moved, "tokens_per_s": timed, "mean_tokens_per_s": mean}
    result["shared_over_per_reader"] = round(mean["shared"] / mean["per-reader casts"], 3)
    result["cast_once_over_per_reader"] = round(mean["cast once"] / mean["per-reader casts"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "norm-cast.json").write_text(json.dumps(result, indent=2) + "\n")
    print(mean, result["shared_over_per_reader"], result["cast_once_over_per_reader"], "moved", moved)


if __name__ == "__main__":
    main()
