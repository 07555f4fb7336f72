"""A chunk's logits in buffers kept from step to step, against fresh blocks per chunk: speed and
page faults of the bare training step, alternating in one process, and the loss's bits.

The chunked loss (``kpod.chunked_loss``) projects the labelled positions onto the vocabulary a chunk
at a time. Until session 41 each chunk allocated its bf16 logits, the fp32 copy and output of the
fused ``log_softmax(..., dtype=float32)`` and a bf16 copy of the gradient afresh: blocks of 50-100 MB
that glibc (above its mmap threshold) and jemalloc (its arena for 8 MiB and more) hand back to the
OS when freed, so each micro-batch faulted them in again. Since then, on a CPU, they live in two
buffers kept inside ``kpod.chunked_loss.kept_logit_buffers`` (the trainer's epochs). Settings:

- ``fresh``: the former path (``kpod.chunked_loss._buffers`` returning ``None``, as off a CPU);
- ``kept``: the trainer's.

It times the bare step of the offline student as the trainer runs it (LoRA r 16 on every linear
layer, the trainer's step weights, eager attention, the loss from hidden states, AdamW) on batches of
``--batch`` rows whose widths cycle through six lengths up to ``--width`` (new shapes, as in the
real loop), and counts the process's minor page faults per step under each setting. The
allocator is the process's own: run it once plainly (glibc) and once with jemalloc preloaded.

    .venv/bin/python benchmarks/logit_buffers.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv/bin/python benchmarks/logit_buffers.py

Results: results/logit-buffers.json, under the allocator's name.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import sys
from pathlib import Path
from unittest import mock

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

    import kpod.chunked_loss
    from kpod.allocator import current_allocator
    from kpod.distill.trainer import training_step_weights
    from kpod.models import attention_implementation

    torch.manual_seed(0)
    model, trainable = bare_step_student()
    widths = [args.width - d for d in (0, 24, 44, 0, 64, 14)]
    batches = [random_training_batch(args.batch, w) for w in widths]
    fresh = lambda: mock.patch.object(kpod.chunked_loss, "_buffers", lambda *a: None)  # noqa: E731
    settings = {"fresh": fresh, "kept": kpod.chunked_loss.kept_logit_buffers}
    next_batch = itertools.cycle(batches).__next__
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-5)
    step = lambda: bare_step(model, next_batch(), True, optimizer)[0]  # noqa: E731
    faults = dict.fromkeys(settings, 0)  # the timed steps' minor page faults, by setting

    def counted(name):
        @contextlib.contextmanager
        def enter():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with settings[name]():
                yield
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        return enter

    with (
        training_step_weights(model, "bf16", "cpu", recompute_elementwise=True),
        attention_implementation(model, "eager"),
    ):
        losses = {}
        for name, setting in settings.items():  # the same batch, no optimiser step: the loss's bits
            with setting():
                losses[name] = bare_step(model, batches[0], True)[1]
        for setting in settings.values():  # a warm-up step each, not timed
            with setting():
                step()
        timed = alternating_rounds({name: counted(name) for name in settings}, step, args.rounds, args.steps)
    mean = {name: round(sum(speeds) / len(speeds), 1) for name, speeds in timed.items()}
    per_step = {name: round(faults[name] / len(speeds)) for name, speeds in timed.items()}
    allocator = current_allocator()
    result = {**provenance(), "allocator": allocator, "batch": args.batch, "widths": widths}
    result |= {"loss": losses, "loss_equal": losses["kept"] == losses["fresh"]}
    result |= {"tokens_per_s": timed, "mean_tokens_per_s": mean, "faults_per_step": per_step}
    result["kept_over_fresh"] = round(mean["kept"] / mean["fresh"], 3)
    path = RESULTS / "logit-buffers.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[allocator] = result
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2) + "\n")
    print(
        allocator,
        mean,
        result["kept_over_fresh"],
        "faults per step",
        per_step,
        "loss equal",
        result["loss_equal"],
    )


if __name__ == "__main__":
    main()
