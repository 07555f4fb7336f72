"""Padding ragged sequences into batches (token ids or embeddings), left or right."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_ids(
    seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids ``[batch, longest]``, attention mask). ``left`` aligns every sequence's end."""
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(longest - len(s), longest) if left else slice(0, len(s))
        ids[i, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_embeddings(seqs: Sequence[torch.Tensor], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings ``[batch, longest, dim]`` zero-padded, attention mask), keeping autograd."""
    longest = max(s.shape[0] for s in seqs)
    first = seqs[0]
    batch = torch.zeros(len(seqs), longest, first.shape[1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=first.device)
    for i, s in enumerate(seqs):
        span = slice(longest - s.shape[0], longest) if left else slice(0, s.shape[0])
        batch[i, span] = s
        mask[i, span] = 1
    return batch, mask
