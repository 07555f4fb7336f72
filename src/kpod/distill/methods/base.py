"""The method object: a name, the examples it trains on at each stage, and its loss.

:class:`Method` is KPOD's own behaviour, switched by flags into its ablations and into std-cot:
each rationale gives its first c_i(t) steps as input at stage t (c = 0 when not ``progressive``)
and is trained with the token-weighted NLL of Eq. 15 (weights 1 when not ``token_weights``).
A method that trains on other examples overrides :meth:`Method.stage_examples`; one with another
loss overrides :meth:`Method.loss` (and :meth:`Method.collate` when an example holds several
sequences). It then lives in its own file and is registered in
:mod:`kpod.distill.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kpod.distill.batches import collate, collate_packed
from kpod.distill.loss import sequence_nll

if TYPE_CHECKING:
    from kpod.distill.stages import StageBuilder, StageExample


@dataclass(frozen=True)
class StudentShape:
    """What a loss needs to know of the student besides the model: ``causal`` or ``seq2seq``, the
    pad id, the decoder's start id (seq2seq), and whether the loss is computed from the hidden
    states in chunks of ``chunk`` positions (:func:`kpod.distill.loss.sequence_nll`)."""

    kind: str
    pad: int
    decoder_start: int
    from_hidden: bool = False
    chunk: int = 512


@dataclass(frozen=True)
class Method:
    """A distillation method trained by the one loop.

    Attributes:
        name: the name configs and the CLI use (``train.method``).
        token_weights: learned token weights in the loss (Eq. 15); else weight 1.
        progressive: follow the in-rationale schedule c_i(t) (else c_i = 0 throughout).
        diversity: the schedule is planned with the diversity term (beta > 0); only read when
            ``progressive``.
        weighted_difficulty: step difficulty uses the learned token weights (Eq. 8); only read
            when ``progressive``.
        eval_prefix: text put before each question at evaluation time.
    """

    name: str
    token_weights: bool = False
    progressive: bool = False
    diversity: bool = True
    weighted_difficulty: bool = True
    eval_prefix: str = ""

    @property
    def needs_weights(self) -> bool:
        """Whether the method needs the token-weighting stage (for its loss or its schedule)."""
        return self.token_weights or (self.progressive and self.weighted_difficulty)

    def stage_examples(self, builder: StageBuilder, stage: int) -> list[StageExample]:
        """Every training example of ``stage``, in data order: each rationale with its first
        c_i(stage) steps as input (an example without steps: question -> answer)."""
        return [
            builder.target(i, builder.n_input_steps(i, stage), weighted=self.token_weights)
            for i in range(len(builder.examples))
        ]

    def collate(
        self, examples: Sequence[StageExample], pad: int, kind: str, pack: int = 0
    ) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors (:func:`kpod.distill.batches.collate`; with ``pack``, causal
        examples packed into rows of that many tokens: :func:`kpod.distill.batches.collate_packed`);
        a method whose examples hold more than one sequence lays them out here for its :meth:`loss`."""
        if pack and kind == "causal":
            return collate_packed(examples, pad, pack)
        return collate(examples, pad, kind)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], student: StudentShape) -> torch.Tensor:
        """The micro-batch's summed weighted token NLL (the trainer divides by the step's targets)."""
        return sequence_nll(
            model, batch, student.kind, student.decoder_start, student.pad, student.from_hidden, student.chunk
        )
