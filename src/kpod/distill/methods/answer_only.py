"""``answer-only``: the student learns question -> answer phrase, never a rationale (a baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kpod.distill.methods.base import Method

if TYPE_CHECKING:
    from kpod.distill.stages import StageBuilder, StageExample


class AnswerOnly(Method):
    def stage_examples(self, builder: StageBuilder, stage: int) -> list[StageExample]:
        return [builder.answer(i) for i in range(len(builder.examples))]
