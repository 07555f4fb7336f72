"""How many copies a commit's forward-only passes and training steps make, and what they cost:
``torch.profiler`` on one thread over the quickstart's token weighting (2 steps), difficulty
scoring (16 rationales) and 2 LoRA training steps (8 x 104 tokens), counting ``aten::copy_`` by
kind: casts of the tied output projection (``[vocab, d]``), key/value heads repeated for the
query heads (5-d ``[b, kv, groups, n, d]``), and the rest.

    PYTHONPATH=<worktree>/src .venv/bin/python benchmarks/copies_profile.py RUN_DIR LABEL

RUN_DIR: a finished quickstart run (its ``data/train.jsonl`` and ``weights/``), e.g. a fresh clone's
``runs/quickstart``. PYTHONPATH picks the commit measured (a `git worktree` of it). Prints one JSON
line: per part, copies and their self CPU milliseconds by kind, and the part's profiled seconds.
Counts are what this measures; the times move with the machine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


def copies(prof) -> dict[str, list[float]]:
    kinds: dict[str, list[float]] = {"head": [0, 0.0], "repeat_kv": [0, 0.0], "other": [0, 0.0]}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::copy_":
            continue
        shape = event.input_shapes[0] if event.input_shapes else []
        kind = "head" if shape[:1] == [49152] else "repeat_kv" if len(shape) == 5 else "other"
        kinds[kind][0] += event.count
        kinds[kind][1] += round(event.self_cpu_time_total / 1e3, 1)
    return kinds


def main(run: Path, label: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kpod import pipeline
    from kpod.api import load_config
    from kpod.distill.loss import sequence_nll
    from kpod.models import (
        StudentConfig,
        attention_implementation,
        frozen_linears_for,
        load_model,
        lora_input_casts_off,
    )
    from kpod.progressive.difficulty import score_difficulties
    from kpod.weighting.train import train_weighting

    torch.set_num_threads(1)
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    examples = pipeline._read_examples(run / "data" / "train.jsonl")
    weights = pipeline._read_weights(run / "weights", config.weighting)
    loaded = load_model(config.student.name, trainable=False, device="cpu")
    torch.manual_seed(0)
    student = StudentConfig().load().model
    ids = torch.randint(100, 40000, (8, 104))
    labels = ids.clone()
    labels[:, :60] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "weights": torch.rand(8, 104),
    }

    def weighting() -> None:
        settings = dataclasses.replace(config.weighting, max_steps=2)
        train_weighting(examples, settings, Path(tempfile.mkdtemp()))

    def scoring() -> None:
        score_difficulties(examples[:16], loaded, weights, batch_size=8, precision="bf16", progress=False)

    def training() -> None:
        with (
            frozen_linears_for(student, "bf16", "cpu"),
            lora_input_casts_off(student),
            attention_implementation(student, "eager"),
        ):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = sequence_nll(student, batch, "causal", 0, 0, from_hidden=True)
                loss.backward()
                student.zero_grad(set_to_none=True)

    out = {"label": label}
    for name, part in (("weighting", weighting), ("scoring", scoring), ("training", training)):
        part()  # warm-up: first-use kernels and imports
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            part()
        out[name] = {"seconds": round(time.perf_counter() - start, 2), "copies": copies(prof)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
