"""The distillation loss: weighted token NLL (Eq. 1 with weights, Eq. 15).

``loss = sum_j w_j * NLL_j / N`` over the target tokens of a micro-batch, where ``N`` is the number
of target tokens in the *whole optimiser step* (every micro-batch of every process), counted before
the step starts. Summing the micro-batch losses' gradients then gives exactly the gradient of the
full batch, whatever the split: gradient accumulation and data parallelism do not change the
objective. With every weight 1 and ``N`` the micro-batch's own count, it is the usual mean
cross-entropy.

Rationale tokens carry their learned weights w_j in (0, 1); answer tokens weight 1 (the paper's
"second term of Eq. 1, which remains constant").

Two ways to the same number: :func:`sequence_nll` with ``from_hidden`` (the default) runs the model
with its output projection bypassed, keeps the hidden states of the labelled positions only and
computes the weighted NLL in chunks of positions (:func:`weighted_linear_nll`), so the logits of
the unlabelled positions are never computed and the labelled ones are never held all at once, for
the forward or the backward; without it the model returns every position's logits (the path kept
for comparison, and for heads the bypass cannot stand in for: :func:`head_bypass_supported`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kpod.chunked_loss import bypassed_head, weighted_linear_nll

IGNORE = -100


def weighted_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, normalizer: float | torch.Tensor
) -> torch.Tensor:
    """``sum_j w_j * -log p(label_j) / normalizer`` over positions whose label is not -100.

    ``logits`` ``[batch, length, vocab]`` already aligned with ``labels`` ``[batch, length]`` (use
    :func:`shift_for_causal_lm` for decoder-only models); ``weights`` has the labels' shape.
    """
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    valid = (labels.reshape(-1) != IGNORE).to(nll.dtype)
    return (nll * weights.reshape(-1).to(nll.dtype) * valid).sum() / normalizer


def shift_for_causal_lm(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align a causal LM's logits with the tokens they predict (position t predicts t + 1).

    Seq2seq models need no shift: their decoder is fed the labels shifted right internally.
    """
    return logits[:, :-1, :], labels[:, 1:], weights[:, 1:]


def count_targets(labels: torch.Tensor, causal: bool) -> int:
    """Target tokens of a micro-batch, as :func:`weighted_token_nll` will count them."""
    return int(((labels[:, 1:] if causal else labels) != IGNORE).sum())


def model_inputs(batch: dict[str, torch.Tensor], kind: str, decoder_start: int, pad: int) -> dict[str, Any]:
    """The forward pass's arguments for a collated micro-batch: packed rows give position ids
    and no attention mask (block-diagonal attention); a seq2seq decoder is fed the labels shifted
    right. No key/value cache: nothing is generated here (and with one transformers would not read
    the packed rows' position ids as sequence boundaries)."""
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "use_cache": False,
        }
    if kind != "causal":
        labels = batch["labels"]
        inputs["decoder_input_ids"] = torch.cat(
            [
                torch.full_like(labels[:, :1], decoder_start),
                labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE, pad),
            ],
            dim=1,
        )
    return inputs


def sequence_nll(
    model: Any,
    batch: dict[str, torch.Tensor],
    kind: str,
    decoder_start: int,
    pad: int,
    from_hidden: bool = False,
    chunk: int = 512,
) -> torch.Tensor:
    """Summed weighted NLL of a micro-batch of a causal or seq2seq student (the caller normalises):
    the labels shifted for a causal model, the decoder fed the labels shifted right for seq2seq.
    ``from_hidden``: through :func:`weighted_linear_nll` (same value and gradients)."""
    inputs = model_inputs(batch, kind, decoder_start, pad)
    labels, weights = batch["labels"], batch["weights"]
    if not from_hidden:
        logits = model(**inputs).logits
        if kind == "causal":
            logits, labels, weights = shift_for_causal_lm(logits, labels, weights)
        return weighted_token_nll(logits, labels, weights, 1.0)
    with bypassed_head(model) as projection:
        hidden = model(**inputs).logits
    if kind == "causal":
        hidden, labels, weights = hidden[:, :-1], labels[:, 1:], weights[:, 1:]
    keep = labels != IGNORE
    return weighted_linear_nll(hidden[keep], projection, labels[keep], weights[keep], chunk)
