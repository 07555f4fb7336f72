"""``mcc-kd``: multi-chain-of-thought consistent distillation (Chen et al., 2023) in the one loop.

Each epoch every question contributes a pair of different rationales, drawn among its correct
ones (seeded by ``train.seed``, the epoch's stage and the qid; :func:`draw_rationale`). Loss:

    mean of the two rationales' token NLL + alpha * (KL(P_a || P_b) + KL(P_b || P_a)) / 2

where P is the student's distribution over the vocabulary at each token of the answer sentence
the two rationales share ("Therefore, the answer is N."), the gradient flowing through both
branches; alpha is ``train.mcc_kd_alpha`` (0.01, their LLaMA setting).

Our choices, where the paper leaves room:

- **Alignment of the answer spans.** Both rationales end with the same answer sentence, but a
  tokenizer may merge its first token with what precedes it, so the two token sequences can differ
  at their start. We align them from the end over their longest common suffix of token ids and
  take the KL at those positions only (the whole sentence whenever the tokens agree, which is the
  usual case).
- **Scale.** The symmetric KL is averaged over a pair's aligned tokens; pairs are then averaged,
  each weighted by its number of target tokens, like the NLL's token mean (the trainer divides
  every micro-batch's summed loss by the step's target count).
- **One rationale.** A question with a single correct rationale trains on it alone (as if paired
  with itself: the same NLL, and a consistency term of 0), without a second forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kpod.chunked_loss import bypassed_head, compute_dtype, head_bypass_supported, weighted_linear_nll
from kpod.distill.batches import collate
from kpod.distill.loss import IGNORE, model_inputs, shift_for_causal_lm, weighted_token_nll
from kpod.distill.methods.base import Method, StudentShape
from kpod.distill.methods.scotd import draw_rationale
from kpod.distill.stages import StageExample

if TYPE_CHECKING:
    from kpod.distill.stages import StageBuilder


@dataclass(frozen=True)
class PairExample(StageExample):
    """Two rationales of one question: this example's sequence and ``partner``'s, each token
    weight halved so that the summed NLL is the mean of the two; ``alpha`` weighs their
    consistency term (``train.mcc_kd_alpha``)."""

    partner: StageExample | None = None
    alpha: float = 0.01

    @property
    def n_targets(self) -> float:
        return (super().n_targets + self.partner.n_targets) / 2

    @property
    def longest(self) -> int:
        return max(super().longest, self.partner.longest)

    def size(self, causal: bool) -> int:
        return super().size(causal) + self.partner.size(causal)


def _halved(example: StageExample) -> StageExample:
    return dataclasses.replace(example, weights=[w / 2 for w in example.weights])


def pair_of(a: StageExample, b: StageExample, alpha: float) -> PairExample:
    fields = {f.name: getattr(_halved(a), f.name) for f in dataclasses.fields(StageExample)}
    return PairExample(**fields, partner=_halved(b), alpha=alpha)


def aligned_answer_positions(a: StageExample, b: StageExample) -> list[tuple[int, int]]:
    """(position in a, position in b) of the answer-sentence tokens the two share, matched from
    the end over the longest common suffix of their token ids."""
    pairs = []
    for pa, pb in zip(reversed(a.answer_positions), reversed(b.answer_positions), strict=False):
        if a.labels[pa] != b.labels[pb] or a.labels[pa] == IGNORE:
            break
        pairs.append((pa, pb))
    return pairs[::-1]


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``(KL(P_a || P_b) + KL(P_b || P_a)) / 2`` per row of ``[n, vocab]`` logits (in fp32)."""
    lp_a = torch.log_softmax(logits_a.float(), dim=-1)
    lp_b = torch.log_softmax(logits_b.float(), dim=-1)
    diff = lp_a - lp_b
    return ((lp_a.exp() - lp_b.exp()) * diff).sum(-1) / 2


class MCCKD(Method):
    def stage_examples(self, builder: StageBuilder, stage: int) -> list[StageExample]:
        out: list[StageExample] = []
        for qid, indices in builder.questions().items():
            drawn = draw_rationale(builder, qid, indices, stage, k=2)
            first = builder.target(drawn[0], 0, weighted=False)
            if len(drawn) == 1 or not builder.examples[drawn[0]].steps:
                out.append(first)
                continue
            second = builder.target(drawn[1], 0, weighted=False)
            pair = builder.cached(
                ("mcc-pair", *drawn), lambda a=first, b=second: pair_of(a, b, builder.mcc_alpha)
            )
            out.append(pair)
        return out

    def collate(
        self, examples: Sequence[StageExample], pad: int, kind: str, pack: int = 0
    ) -> dict[str, torch.Tensor]:
        """Every example's row, then the partners' rows; ``kl_a``/``kl_b`` ([m, 2]: row and label
        position) are the aligned answer tokens, ``kl_scale`` [m] each one's share of its pair's
        consistency term (module docstring) times the pair's alpha. Never packed (the aligned
        positions are per row)."""
        rows = list(examples)
        kl_a, kl_b, scale = [], [], []
        for i, e in enumerate(examples):
            if not isinstance(e, PairExample):
                continue
            j = len(rows)
            rows.append(e.partner)
            aligned = aligned_answer_positions(e, e.partner)
            for pa, pb in aligned:
                kl_a.append((i, pa))
                kl_b.append((j, pb))
                scale.append(e.alpha * e.n_targets / len(aligned))
        batch = collate(rows, pad, kind)
        batch["kl_a"] = torch.tensor(kl_a, dtype=torch.long).reshape(-1, 2)
        batch["kl_b"] = torch.tensor(kl_b, dtype=torch.long).reshape(-1, 2)
        batch["kl_scale"] = torch.tensor(scale, dtype=torch.float32)
        return batch

    def loss(self, model: Any, batch: dict[str, torch.Tensor], student: StudentShape) -> torch.Tensor:
        """Summed (halved) NLL of every row + alpha * the scaled symmetric KL of the aligned answer
        tokens, from one forward pass over the rows."""
        return mcc_loss(model, batch, student)


def mcc_loss(model: Any, batch: dict[str, torch.Tensor], student: StudentShape) -> torch.Tensor:
    """MCC-KD's micro-batch loss (see the module docstring), summed for the trainer to normalise:
    the rows' weighted NLL + sum over aligned answer tokens of ``kl_scale`` (alpha included) times
    their symmetric KL."""
    inputs = model_inputs(batch, student.kind, student.decoder_start, student.pad)
    labels, weights = batch["labels"], batch["weights"]
    causal = student.kind == "causal"
    shift = 1 if causal else 0  # a causal model predicts label position p from position p - 1

    def picked(states: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return states[where[:, 0], where[:, 1] - shift]

    if student.from_hidden and head_bypass_supported(model):
        with bypassed_head(model) as projection:
            hidden = model(**inputs).logits
        h, y, w = (hidden[:, :-1], labels[:, 1:], weights[:, 1:]) if causal else (hidden, labels, weights)
        keep = y != IGNORE
        nll = weighted_linear_nll(h[keep], projection, y[keep], w[keep], student.chunk)
        if not len(batch["kl_scale"]):
            return nll
        w_out = projection.to(compute_dtype(hidden))
        logits_a = picked(hidden, batch["kl_a"]).to(w_out.dtype) @ w_out.T
        logits_b = picked(hidden, batch["kl_b"]).to(w_out.dtype) @ w_out.T
    else:
        logits = model(**inputs).logits
        if causal:
            nll = weighted_token_nll(*shift_for_causal_lm(logits, labels, weights), 1.0)
        else:
            nll = weighted_token_nll(logits, labels, weights, 1.0)
        if not len(batch["kl_scale"]):
            return nll
        logits_a, logits_b = picked(logits, batch["kl_a"]), picked(logits, batch["kl_b"])
    return nll + (symmetric_kl(logits_a, logits_b) * batch["kl_scale"]).sum()
