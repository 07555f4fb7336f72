"""What a training step keeps for its backward pass, by the operation that keeps it.

Most of a CPU training step's peak memory beyond the model is the tensors that autograd saves in
the forward pass for the backward one. This runs one forward pass of the offline student as the
trainer runs it (LoRA r 16 on every linear layer, bf16 autocast with frozen weights held in bf16,
LoRA inputs uncast, the scaling folded, each norm's output cast once for its readers, eager
attention, the loss from hidden states) on one batch of random tokens, walks the autograd graph
from the loss, and adds up the bytes of every tensor a node saved, each storage counted once, the
model's own weights left out. ``--per-reader`` runs it with every projection casting the norms'
outputs itself (the trainer's before session 38).

    .venv/bin/python benchmarks/saved_activations.py                  # batch 4 x 224 tokens
    .venv/bin/python benchmarks/saved_activations.py --per-reader

Prints the table (MiB by node type, saved slot, dtype and shape per layer) and writes it with the
totals to results/saved-activations[-per-reader].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, bare_step_student, provenance, random_training_batch  # noqa: E402


def saved_tensors(root) -> list[tuple[str, str, object]]:
    """(node type, saved slot, tensor) for every tensor saved by a node reachable from ``root``
    (autograd's ``_saved_*`` attributes; ``saved_tensors`` of custom functions)."""
    import torch

    found, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        todo += [next_node for next_node, _ in getattr(node, "next_functions", ())]
        slots = [a for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            slots.append("saved_tensors")
        for slot in slots:
            try:
                value = getattr(node, slot)
            except RuntimeError:  # freed, or not a tensor slot
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            found += [(type(node).__name__, slot, v) for v in values if isinstance(v, torch.Tensor)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--per-reader", action="store_true", help="no shared norm casts")
    args = parser.parse_args()

    import torch

    from kpod.distill.loss import sequence_nll
    from kpod.distill.trainer import training_step_weights
    from kpod.models import attention_implementation, inner_model

    torch.manual_seed(0)
    model, _ = bare_step_student()
    batch = random_training_batch(args.batch, args.width)
    layers = len(inner_model(model).model.layers)
    step_weights = training_step_weights(model, "bf16", "cpu", share_norm_casts=not args.per_reader)
    with step_weights, attention_implementation(model, "eager"):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sequence_nll(model, batch, "causal", 0, 0, from_hidden=True)
        found = saved_tensors(loss.grad_fn)
    rows: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # count, bytes
    counted: set[int] = set()
    for node, slot, tensor in found:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in weights or storage.data_ptr() in counted or storage.nbytes() == 0:
            continue
        counted.add(storage.data_ptr())
        key = (node, slot, str(tensor.dtype).removeprefix("torch."), "x".join(map(str, tensor.shape)))
        rows[key][0] += 1
        rows[key][1] += storage.nbytes()
    table = sorted(rows.items(), key=lambda kv: -kv[1][1])
    total = sum(b for _, (_, b) in table)
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    print(f"saved for the backward pass: {mib(total)} MiB in {len(counted)} storages ({layers} layers)")
    for (node, slot, dtype, shape), (count, nbytes) in table[:25]:
        print(f"{mib(nbytes):8.1f} MiB  {count:4d} x  {node:28s} {slot:18s} {dtype:9s} {shape}")
    result = {**provenance(), "batch": args.batch, "width": args.width, "per_reader": args.per_reader}
    result |= {
        "saved_mib": mib(total),
        "storages": len(counted),
        "rows": [
            {"node": n, "slot": s, "dtype": d, "shape": sh, "count": c, "mib": mib(b)}
            for (n, s, d, sh), (c, b) in table
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "saved-activations-per-reader.json" if args.per_reader else "saved-activations.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
