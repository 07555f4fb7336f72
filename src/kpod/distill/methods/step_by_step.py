"""``step-by-step``: distilling step-by-step (Hsieh et al. 2023) in the one loop.

One model is trained on two tasks told apart by a prefix of the input: ``[label]`` question ->
answer, and ``[rationale]`` question -> rationale, with loss ``L_label + alpha * L_rationale``.
Our choice: the rationale task's target is the rationale followed by the answer phrase (our
rendering always ends with it), and alpha (``train.step_by_step_alpha``) scales every token weight
of that task; the student is evaluated with the ``[label]`` prefix, so it answers directly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kpod.distill.methods.base import Method

if TYPE_CHECKING:
    from kpod.distill.stages import StageBuilder, StageExample

LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


class StepByStep(Method):
    def stage_examples(self, builder: StageBuilder, stage: int) -> list[StageExample]:
        out: list[StageExample] = []
        for i, example in enumerate(builder.examples):
            out.append(builder.answer(i, prefix=LABEL_PREFIX))
            if example.steps:
                out.append(
                    builder.cached(
                        (i, "rationale"),
                        lambda e=example: _scaled(
                            builder.whole(dataclasses.replace(e, question=RATIONALE_PREFIX + e.question)),
                            builder.step_by_step_alpha,
                        ),
                    )
                )
        return out


def _scaled(example: StageExample, factor: float) -> StageExample:
    return dataclasses.replace(example, weights=[w * factor for w in example.weights])
