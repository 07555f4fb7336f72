"""Optimiser-step batches: length-grouped, deterministic per (seed, epoch), split across processes.

The data order of an epoch depends only on the seed and the epoch number, so a resumed run can
skip to its data position by counting steps, and one process and N processes see the same global
batches: process r takes examples r, r + N, ... of each global batch, then cuts its share into
micro-batches. Every process runs the same number of micro-batches per step (collective
operations must line up); a process whose share runs out gets a padding example whose loss is
multiplied by zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kpod.distill.loss import IGNORE
from kpod.distill.stages import StageExample


def global_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Example indices of every optimiser step of an epoch.

    With ``group_by_length`` the shuffled examples are cut into windows of 16 batches, each window
    sorted by length and cut into batches, and the batches shuffled: similar lengths share a batch
    (less padding) while the order stays random from epoch to epoch.
    """
    rng = random.Random(f"kpod-batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class MicroBatch:
    """Indices of one micro-batch and a 0/1 factor (0 for a padding micro-batch)."""

    indices: list[int]
    scale: float


# Padded tokens per forward pass above which ``micro_batch_size: auto`` splits a batch on a CPU. The
# real loop (SmolLM2-135M, LoRA, bf16 on an AVX512-BF16 CPU; BENCHMARKS.md "Issue #21, session 35")
# ran batches of 8 GSM8K examples (about 1,300-1,800 padded tokens) 10 % faster in two passes of 4
# than in one, with a quarter less peak memory, and 9 % slower in four passes of 2; batches of about
# 1,000-1,280 tokens split in two ran at one pass's speed with 10 % less memory.
AUTO_MICRO_BATCH_TOKENS = 1024


def micro_batch_rows(rows: int, width: int, setting: int | str, device_type: str) -> int:
    """Examples per forward pass for a process's share of ``rows`` examples padded to ``width``
    tokens. A number is taken as it is. ``auto``: the whole share on a GPU; on a CPU the share in
    the fewest equal parts of at most :data:`AUTO_MICRO_BATCH_TOKENS` padded tokens each (at least
    one example a part). ``width`` is the longest example of the global batch, so every process
    finds the same count. Gradient accumulation leaves the loss as it is (the normalisation is
    over the whole batch) up to the rounding of summing the parts' gradients.
    """
    if setting != "auto":
        return int(setting)
    if device_type != "cpu" or rows < 1:
        return max(rows, 1)
    parts = min(rows, math.ceil(rows * width / AUTO_MICRO_BATCH_TOKENS))
    return math.ceil(rows / parts)


def process_share(batch: Sequence[int], rank: int, world: int, micro_batch_size: int) -> list[MicroBatch]:
    """The micro-batches process ``rank`` runs for one global batch (same count on every rank)."""
    share = list(batch[rank::world])
    n_micro = math.ceil(math.ceil(len(batch) / world) / micro_batch_size)
    out = []
    for k in range(n_micro):
        part = share[k * micro_batch_size : (k + 1) * micro_batch_size]
        out.append(MicroBatch(part, 1.0) if part else MicroBatch([batch[0]], 0.0))
    return out


def collate(examples: Sequence[StageExample], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` and ``weights``.

    Causal: labels align with ``input_ids``. Seq2seq: ``input_ids`` is the encoder input and
    ``labels``/``weights`` the (separately padded) decoder target.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    label_width = width if kind == "causal" else max(len(e.labels) for e in examples)
    labels = torch.full((len(examples), label_width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(examples), label_width), dtype=torch.float32)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        weights[row, : len(e.weights)] = torch.tensor(e.weights, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def collate_packed(examples: Sequence[StageExample], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Causal examples packed into rows of at most ``row_length`` tokens (first fit, longest
    first; an example longer than a row gets a row of its own), without padding between them.

    ``position_ids`` restart at 0 for each example and no attention mask is passed to the model:
    transformers then builds a block-diagonal causal mask from the position ids, so no example
    attends to another (tested: every example's loss packed equals its loss alone). The label of
    each example's first token is -100 (it would be predicted from the previous example's last
    token; it is a prompt token anyway). The row's tail is padding with position ids of its own
    and labels -100. ``attention_mask`` marks the real tokens, for counting only.
    """
    rows: list[list[StageExample]] = []
    sizes: list[int] = []
    for e in sorted(examples, key=lambda x: -len(x.input_ids)):
        fit = next((r for r, size in enumerate(sizes) if size + len(e.input_ids) <= row_length), None)
        if fit is None:
            rows.append([e])
            sizes.append(len(e.input_ids))
        else:
            rows[fit].append(e)
            sizes[fit] += len(e.input_ids)
    width = max(sizes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            positions[r, at : at + n] = torch.arange(n)
            real[r, at : at + n] = 1
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            weights[r, at : at + n] = torch.tensor(e.weights, dtype=torch.float32)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": real,
        "labels": labels,
        "weights": weights,
    }
