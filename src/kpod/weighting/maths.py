"""The mathematics of token weighting by mask learning (paper section 3.3), as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-6


def binary_gumbel_mask(
    w: torch.Tensor, tau: float = 1.0, hard: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Eq. (4): m_j = GumbelSoftmax(w_j), a sample of "keep token j" with probability w_j.

    A two-class Gumbel-softmax over the logits ``[log(1 - w), log w]``. With ``hard=True`` the
    forward value is the exact 0/1 sample (``P(m = 1) = w`` for any ``tau``) and the backward pass
    uses the soft sample's gradient (straight-through), so the answer loss reaches ``w``.
    """
    w = w.clamp(_EPS, 1 - _EPS)
    logits = torch.stack([torch.log1p(-w), torch.log(w)], dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, device=w.device, dtype=w.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(_EPS, 1 - _EPS)))
    soft = F.softmax((logits + gumbel) / tau, dim=-1)[..., 1]
    if not hard:
        return soft
    hard_sample = (soft > 0.5).to(soft.dtype)
    return hard_sample + soft - soft.detach()


def apply_mask(embeddings: torch.Tensor, keep: torch.Tensor, mask_embedding: torch.Tensor) -> torch.Tensor:
    """The masked rationale r[m] in embedding space: ``m * e + (1 - m) * e_mask``.

    Replacing a masked token's embedding (rather than its id) keeps the path from the answer loss
    back to the mask, which swapping token ids would cut.
    """
    keep = keep.unsqueeze(-1).to(embeddings.dtype)
    return keep * embeddings + (1 - keep) * mask_embedding.to(embeddings.dtype)


def mask_ratio_loss(keep: torch.Tensor, valid: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Eq. (6): L_m = sum_j m_j over each rationale's tokens (per example, shape ``[batch]``).

    ``normalize=True`` divides by the rationale's length (the kept ratio), a deviation from the
    printed form that makes ``alpha`` independent of rationale length.
    """
    kept = (keep * valid).sum(dim=-1)
    if normalize:
        kept = kept / valid.sum(dim=-1).clamp(min=1)
    return kept


def keypoint_objective(answer_loss: torch.Tensor, mask_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (7): L_k = L_p + alpha * L_m."""
    return answer_loss + alpha * mask_loss


def align_weights(
    source_offsets: list[tuple[int, int]],
    source_weights: list[float],
    target_offsets: list[tuple[int, int]],
    default: float = 1.0,
) -> list[float]:
    """Re-slice token weights onto another tokenization of the same text, by character offsets.

    Each target token takes the character-overlap-weighted mean of the source weights it overlaps;
    a token overlapping no source token (whitespace outside any, special tokens) gets ``default``.
    Both offset lists must be sorted; runs in O(n + m).
    """
    out: list[float] = []
    i = 0
    n = len(source_offsets)
    for start, end in target_offsets:
        while i < n and source_offsets[i][1] <= start:
            i += 1
        total = 0.0
        weight = 0.0
        j = i
        while j < n and source_offsets[j][0] < end:
            overlap = min(end, source_offsets[j][1]) - max(start, source_offsets[j][0])
            if overlap > 0:
                total += overlap
                weight += overlap * source_weights[j]
            j += 1
        out.append(weight / total if total > 0 else default)
    return out
