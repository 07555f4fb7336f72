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

from dataclasses import dataclass
from typing import Any

from kpod.data.schema import Example
from kpod.distill.loss import IGNORE
from kpod.prompt import PromptFormat, TokenizedExample, render_example, tokenize_rendered, tokenize_split
from kpod.weighting.weights import TokenWeights, rendered_token_weights


@dataclass(frozen=True)
class StageExample:
    """Tensors-to-be of one example at one stage."""

    input_ids: list[int]  # causal: the whole sequence; seq2seq: the encoder input
    labels: list[int]  # causal: aligned with input_ids; seq2seq: the decoder target
    weights: list[float]  # aligned with labels
    n_input_steps: int

    @property
    def n_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


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
        return StageExample(tokens.input_ids, labels, weights, c)
    # Seq2seq: cut after the last input piece; the gap before the first target belongs to it.
    cut = rendered.steps[c - 1].end if c > 0 else rendered.prompt.end
    encoder_ids, tokens = tokenize_split(rendered, tokenizer, cut)
    weights = _token_weights(example, tokens, weights_row, c)
    return StageExample(encoder_ids, list(tokens.input_ids), weights, c)
