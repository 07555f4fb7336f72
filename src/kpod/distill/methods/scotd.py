"""``scotd``: symbolic chain-of-thought distillation (Li et al., 2023) in the one loop.

SCoTD samples many rationales per question from the teacher and trains on them. Here each epoch
gives every question one rationale, drawn uniformly among its correct ones
(:func:`kpod.data.splits.rationale_is_correct`; all of them if none is), a new draw each epoch,
seeded by ``train.seed``, the epoch's stage and the qid; the loss is the token-mean NLL of the
rationale and the answer (std-cot's). So SCoTD sees one rationale per question per epoch, the same
budget as the other methods on one rationale per question, but a different one each epoch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from kpod.data.splits import rationale_is_correct
from kpod.distill.methods.base import Method

if TYPE_CHECKING:
    from kpod.distill.stages import StageBuilder, StageExample


def draw_rationale(builder: StageBuilder, qid: str, indices: list[int], stage: int, k: int = 1) -> list[int]:
    """``k`` distinct rationales of question ``qid`` for ``stage`` (fewer if it has fewer),
    uniformly among its correct ones, the draw fixed by the seed, the stage and the qid."""
    correct = [i for i in indices if rationale_is_correct(builder.examples[i])] or indices
    rng = random.Random(f"kpod-draw-{builder.seed}-{stage}-{qid}")
    return rng.sample(correct, min(k, len(correct)))


class SCoTD(Method):
    def stage_examples(self, builder: StageBuilder, stage: int) -> list[StageExample]:
        return [
            builder.target(draw_rationale(builder, qid, indices, stage)[0], 0, weighted=False)
            for qid, indices in builder.questions().items()
        ]
