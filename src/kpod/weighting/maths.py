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


def mask_ratio_loss(
    keep: torch.Tensor, valid: torch.Tensor, normalize: bool = False, budget: float | None = None
) -> torch.Tensor:
    """Eq. (6): L_m = sum_j m_j over each rationale's tokens (per example, shape ``[batch]``).

    ``budget`` (a kept ratio in [0, 1)) penalises only what is kept beyond it,
    ``max(0, sum_j m_j - budget * n)``: a hinge instead of Eq. (6)'s unbounded push towards
    masking everything. Under the budget only the answer loss moves the weights, so tokens compete
    for the budget rather than all drifting to 0 (not in the paper; see BENCHMARKS.md).

    ``normalize=True`` divides by the rationale's length n (the kept ratio), a deviation from the
    printed form that makes ``alpha`` independent of rationale length but also n times weaker.
    """
    n = valid.sum(dim=-1)
    kept = (keep * valid).sum(dim=-1)
    if budget is not None:
        kept = torch.relu(kept - budget * n)
    if normalize:
        kept = kept / n.clamp(min=1)
    return kept


def bernoulli_log_prob(keep: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log p(m | w) of a sampled mask, summed over each rationale's valid tokens (last dimension).

    The hard samples of Eq. (4) are exact Bernoulli(w) draws, so this is their log-likelihood.
    """
    w = w.clamp(_EPS, 1 - _EPS)
    keep = keep.to(w.dtype)
    return ((keep * torch.log(w) + (1 - keep) * torch.log1p(-w)) * valid).sum(dim=-1)


def score_function_surrogate(losses: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """A surrogate whose gradient is the score-function (REINFORCE) estimate of d E_m[L_p(m)] / d w.

    ``losses`` and ``log_probs`` have shape ``[K, batch]``: the answer loss of K masks sampled per
    rationale and their log-probabilities. Each sample's loss is compared with the mean of the other
    K - 1 (a leave-one-out baseline, which keeps the estimate unbiased and cuts its variance), so the
    result, averaged over the K samples, is ``mean_k (L_k - b_k) * log p(m_k)`` per rationale.

    Why not the straight-through gradient of Eq. (4): it is the first-order effect of sliding a
    token's embedding towards the mask embedding, which with a frozen predictor says "mask more" for
    almost every token even where masking it really costs the answer (measured in BENCHMARKS.md).
    The score function sees the loss of the actual discrete masks.
    """
    k = losses.shape[0]
    if k < 2:
        raise ValueError("the score-function estimate needs at least 2 samples per rationale")
    losses = losses.detach()
    baseline = (losses.sum(dim=0, keepdim=True) - losses) / (k - 1)
    return ((losses - baseline) * log_probs).mean(dim=0)


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


def rescale_weights(weights: list[float], mode: str = "none", floor: float = 0.1) -> list[float]:
    """Optional per-rationale rescaling of the final weights before they enter Eqs. (8) and (15).

    ``none`` returns them unchanged: the paper's use of the raw ``w`` (digest section 2.4).
    ``minmax`` maps the rationale's lowest weight to ``floor`` and its highest to 1, linearly:
    ``floor + (1 - floor) * (w - min) / (max - min)`` (a rationale whose weights are all equal gets
    1 everywhere). Not in the paper. Why offer it: with the score-function estimator and the
    length-normalised L_m, our module ranks keypoints well but keeps almost every token
    (BENCHMARKS.md, token weighting), so the raw weights differ by a few per cent and the weighted
    loss is close to the unweighted one; ``minmax`` keeps the learned ranking and restores a contrast.
    """
    if mode == "none" or not weights:
        return list(weights)
    if mode != "minmax":
        raise ValueError(f"unknown rescale mode '{mode}' (none or minmax)")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    low, high = min(weights), max(weights)
    if high - low < 1e-12:
        return [1.0] * len(weights)
    return [floor + (1 - floor) * (w - low) / (high - low) for w in weights]


def budget_weights(
    logits: torch.Tensor, valid: torch.Tensor, target: float, iterations: int = 30
) -> torch.Tensor:
    """Keep probabilities whose mean over each rationale is ``target``: ``w = sigmoid(s - t)`` with
    the shift t of each rationale found by bisection (no gradient flows through t).

    A budget by construction (not in the paper): the mask generator no longer chooses how much to
    keep, only which tokens, so the answer loss must trade tokens against each other instead of
    keeping all of them, and the weights spread (keypoints up, filler down). Eq. (6)'s sparsity
    term is then constant and left out. ``valid`` marks real tokens (1) and padding (0); padding
    gets weight 0."""
    with torch.no_grad():
        low = (logits - 30.0).where(valid > 0, torch.full_like(logits, float("inf"))).amin(dim=-1)
        high = (logits + 30.0).where(valid > 0, torch.full_like(logits, float("-inf"))).amax(dim=-1)
        n = valid.sum(dim=-1).clamp(min=1)
        for _ in range(iterations):
            mid = (low + high) / 2
            mean = (torch.sigmoid(logits - mid[:, None]) * valid).sum(dim=-1) / n
            low = torch.where(mean > target, mid, low)
            high = torch.where(mean > target, high, mid)
        shift = torch.where(valid.sum(dim=-1) > 0, (low + high) / 2, torch.zeros_like(low))
    return torch.sigmoid(logits - shift[:, None]) * valid
