"""Stage-wise training examples (paper section 3.4, Figure 1).

At stage t a rationale with n steps gives its first c = c_i(t) steps as *input* and asks for the
remaining n - c steps and the answer phrase. Labels cover only those target tokens (and the end
marker, so the student learns to stop); rationale tokens carry their learned weights, re-sliced
from ``weights.jsonl`` by character offsets; answer tokens weight 1 (Eq. 15).

Causal students get one sequence with the input part masked in the labels. Seq2seq students get
the input part in the encoder and the target part as decoder labels (the model shifts them right
itself: no shift here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kpod.data.schema import Example
from kpod.distill.loss import IGNORE
from kpod.progressive.schedule import StageInputs
from kpod.prompt import PromptFormat, TokenizedExample, render_example, tokenize_rendered, tokenize_split
from kpod.weighting.weights import TokenWeights, rationale_key, rendered_token_weights

if TYPE_CHECKING:
    from kpod.distill.methods import Method


@dataclass(frozen=True)
class StageExample:
    """Tensors-to-be of one example at one stage."""

    input_ids: list[int]  # causal: the whole sequence; seq2seq: the encoder input
    labels: list[int]  # causal: aligned with input_ids; seq2seq: the decoder target
    weights: list[float]  # aligned with labels
    n_input_steps: int
    answer_positions: tuple[int, ...] = ()  # where the answer sentence's tokens sit in ``labels``

    @property
    def n_targets(self) -> float:
        return sum(1 for label in self.labels if label != IGNORE)

    @property
    def longest(self) -> int:
        """The longest sequence the example feeds the model (``train.max_length`` applies to it)."""
        return max(len(self.input_ids), len(self.labels))

    def size(self, causal: bool) -> int:
        """Tokens the example puts through the model (for batching by length)."""
        return len(self.input_ids) + (0 if causal else len(self.labels))


def _token_weights(
    example: Example, tokens: TokenizedExample, row: TokenWeights | None, first_target: int
) -> list[float]:
    """Learned weights for target rationale tokens, 1 for answer and end tokens."""
    n_steps = len(example.steps)
    aligned = rendered_token_weights(example, tokens, row)
    return [
        w if first_target <= seg < n_steps else 1.0 for w, seg in zip(aligned, tokens.segments, strict=True)
    ]


def build_stage_example(
    example: Example,
    n_input_steps: int,
    tokenizer: Any,
    *,
    kind: str = "causal",
    weights_row: TokenWeights | None = None,
    fmt: PromptFormat | None = None,
) -> StageExample:
    """The training example of ``example`` when its first ``n_input_steps`` steps are input."""
    fmt = fmt or PromptFormat()
    c = max(0, min(n_input_steps, len(example.steps)))
    rendered = render_example(example, fmt, tokenizer)
    if kind == "causal":
        tokens = tokenize_rendered(rendered, tokenizer, fmt)
        weights = _token_weights(example, tokens, weights_row, c)
        labels = [
            tok if seg >= c else IGNORE for tok, seg in zip(tokens.input_ids, tokens.segments, strict=True)
        ]
        return StageExample(tokens.input_ids, labels, weights, c, _answer_positions(example, tokens))
    # Seq2seq: cut after the last input piece; the gap before the first target belongs to it.
    cut = rendered.steps[c - 1].end if c > 0 else rendered.prompt.end
    encoder_ids, tokens = tokenize_split(rendered, tokenizer, cut)
    weights = _token_weights(example, tokens, weights_row, c)
    return StageExample(encoder_ids, list(tokens.input_ids), weights, c, _answer_positions(example, tokens))


def _answer_positions(example: Example, tokens: TokenizedExample) -> tuple[int, ...]:
    """Positions of the answer sentence's tokens (the piece after the last step)."""
    return tuple(p for p, seg in enumerate(tokens.segments) if seg == len(example.steps))


def _without_rationale(example: Example, prefix: str = "") -> Example:
    return dataclasses.replace(
        example, question=prefix + example.question, rationale="", steps=(), keypoints=()
    )


class StageBuilder:
    """Builds a method's training examples for any stage, caching tokenization across stages.

    The method (:meth:`kpod.distill.methods.Method.stage_examples`) chooses which examples a stage
    has; this class renders and tokenizes them: :meth:`target` (a rationale's steps after the
    first c, then the answer), :meth:`answer` (question -> answer), :meth:`whole` (any example,
    unweighted), :meth:`cached` (anything else a method builds).

    Args:
        method: the method.
        examples: training examples (one rationale each; examples without steps are trained on
            the answer only under every method).
        tokenizer, kind, fmt: the student's tokenizer, ``causal`` or ``seq2seq``, the prompt format.
        weights: token weights by rationale key (needed when ``method.token_weights``).
        inputs: the schedule's c_i(t) by rationale key, one entry per stage 0..T (needed when
            ``method.progressive``); stages past the last entry use the last (zeros).
        step_by_step_alpha: the rationale task's weight for ``step-by-step``.
        seed: seeds the draws of methods that sample rationales (``scotd``, ``mcc-kd``).
        mcc_alpha: the consistency term's weight for ``mcc-kd``.
    """

    def __init__(
        self,
        method: Method,
        examples: Sequence[Example],
        tokenizer: Any,
        *,
        kind: str = "causal",
        fmt: PromptFormat | None = None,
        weights: Mapping[str, TokenWeights] | None = None,
        inputs: StageInputs | Mapping[str, Sequence[int]] | None = None,
        step_by_step_alpha: float = 1.0,
        seed: int = 0,
        mcc_alpha: float = 0.01,
    ) -> None:
        from kpod.errors import ConfigError

        self.method = method
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.kind = kind
        self.fmt = fmt or PromptFormat()
        self.weights = weights or {}
        self.inputs = StageInputs.of(inputs)
        self.step_by_step_alpha = step_by_step_alpha
        self.seed = seed
        self.mcc_alpha = mcc_alpha
        self._cache: dict[Hashable, StageExample] = {}
        self.keys = [rationale_key(e) for e in self.examples]
        keys = [k for k, e in zip(self.keys, self.examples, strict=True) if e.steps]
        if method.token_weights:
            missing = [k for k in keys if k not in self.weights]
            if missing:
                raise ConfigError(
                    f"method '{method.name}' needs token weights for every rationale; "
                    f"{len(missing)} of {len(keys)} have none (run `kpod weights train` on this data)"
                )
        if method.progressive:
            missing = [k for k in keys if k not in self.inputs]
            if missing:
                raise ConfigError(
                    f"method '{method.name}' needs a schedule covering every rationale; "
                    f"{len(missing)} of {len(keys)} are not in it (run `kpod schedule plan` on this data)"
                )

    def questions(self) -> dict[str, list[int]]:
        """The indices of each question's rationales (with steps), by qid in data order."""
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(self.examples):
            groups.setdefault(e.qid, []).append(i)
        return groups

    def n_input_steps(self, index: int, stage: int) -> int:
        """c_i(t): leading steps of rationale ``index`` given as input at ``stage``."""
        if not self.method.progressive:
            return 0
        return self.inputs.n_input_steps(self.keys[index], stage)

    def cached(self, key: Hashable, build: Callable[[], StageExample]) -> StageExample:
        """``build()``, once per ``key`` (stages repeat most examples)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def whole(self, example: Example) -> StageExample:
        """``example`` with its whole rationale and answer as target, weight 1 everywhere."""
        return build_stage_example(example, 0, self.tokenizer, kind=self.kind, fmt=self.fmt)

    def answer(self, index: int, prefix: str = "") -> StageExample:
        """Question (after ``prefix``) -> answer phrase, without the rationale."""
        return self.cached(
            (index, "answer", prefix), lambda: self.whole(_without_rationale(self.examples[index], prefix))
        )

    def target(self, index: int, c: int, *, weighted: bool) -> StageExample:
        """Rationale ``index`` with its first ``c`` steps as input; its later steps and the answer
        are the target, weighted by the learned token weights when ``weighted``. An example without
        steps gives :meth:`answer`."""
        example = self.examples[index]
        if not example.steps:
            return self.answer(index)
        row = self.weights.get(self.keys[index]) if weighted else None
        return self.cached(
            (index, c, weighted),
            lambda: build_stage_example(
                example, c, self.tokenizer, kind=self.kind, fmt=self.fmt, weights_row=row
            ),
        )

    def stage(self, stage: int) -> list[StageExample]:
        """Every training example of ``stage``, in data order (the method decides which)."""
        return self.method.stage_examples(self, stage)
