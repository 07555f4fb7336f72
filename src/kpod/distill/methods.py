"""Methods as configuration: KPOD, its ablations and the baselines, all trained by one loop.

A method only decides, for every stage (epoch), which training examples exist, how many leading
steps of each rationale are input, and what weight each target token carries:

==========================  ==========  =============  ============================================
method                      weights     progressive    notes
==========================  ==========  =============  ============================================
``kpod``                    learned     schedule       Eq. 15 with the planned c_i(t)
``std-cot``                 1           no             Eq. 1: the whole rationale every epoch
``answer-only``             1           no             no rationale: prompt -> answer phrase
``step-by-step``            1 / alpha   no             Hsieh et al. 2023, two tasks (see below)
``kpod-no-weights``         1           schedule       paper's "w.o.-sig" (weights out of the loss)
``kpod-no-progressive``     learned     no             paper's "w.o.-prog"
``kpod-no-diversity``       learned     schedule       schedule planned with beta = 0 ("w.o.-div")
``kpod-uniform-difficulty`` learned     schedule       Eq. 8 with uniform weights ("w.o.-sig-dif")
==========================  ==========  =============  ============================================

The last two differ from ``kpod`` only in how the schedule is planned (:attr:`Method.diversity`,
:attr:`Method.weighted_difficulty`); the pipeline plans their schedule accordingly and the loop
treats them like ``kpod``.

``kpod-no-weights`` keeps the schedule planned with token-weighted difficulty: the paper's
"w.o.-sig" removes the weights from the distillation loss only, and "w.o.-sig-dif" is its own row.

Distilling step-by-step (Hsieh et al. 2023) trains one model on two tasks told apart by a prefix
of the input: ``[label]`` question -> answer, and ``[rationale]`` question -> rationale, with loss
``L_label + alpha * L_rationale``. Our choice: the rationale task's target is the rationale followed
by the answer phrase (our rendering always ends with it), and alpha scales every token weight of
that task; the student is evaluated with the ``[label]`` prefix, so it answers directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kpod.data.schema import Example
from kpod.distill.stages import StageExample, build_stage_example
from kpod.prompt import PromptFormat
from kpod.weighting.weights import TokenWeights, rationale_key

LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


@dataclass(frozen=True)
class Method:
    """What distinguishes one training method from another.

    Attributes:
        name: the config value.
        rationale: train on rationales (``False``: answer-only).
        token_weights: learned token weights in the loss (Eq. 15) instead of 1.
        progressive: follow the in-rationale schedule c_i(t) (else c_i = 0 throughout).
        diversity: plan the schedule with the diversity term (beta > 0 in Eq. 12).
        weighted_difficulty: step difficulty with token weights (Eq. 8) rather than uniform ones.
        multitask: distilling step-by-step's two prefixed tasks.
    """

    name: str
    rationale: bool = True
    token_weights: bool = False
    progressive: bool = False
    diversity: bool = True
    weighted_difficulty: bool = True
    multitask: bool = False

    @property
    def needs_weights(self) -> bool:
        """Whether the method needs the token-weighting stage (for its loss or its schedule)."""
        return self.token_weights or (self.progressive and self.weighted_difficulty)

    @property
    def eval_prefix(self) -> str:
        """Text put before each question at evaluation time."""
        return LABEL_PREFIX if self.multitask else ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("kpod", token_weights=True, progressive=True),
        Method("std-cot"),
        Method("answer-only", rationale=False),
        Method("step-by-step", multitask=True),
        Method("kpod-no-weights", token_weights=False, progressive=True),
        Method("kpod-no-progressive", token_weights=True, progressive=False),
        Method("kpod-no-diversity", token_weights=True, progressive=True, diversity=False),
        Method("kpod-uniform-difficulty", token_weights=True, progressive=True, weighted_difficulty=False),
    )
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    from kpod.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def _without_rationale(example: Example, prefix: str = "") -> Example:
    return dataclasses.replace(
        example, question=prefix + example.question, rationale="", steps=(), keypoints=()
    )


def _scaled(example: StageExample, factor: float) -> StageExample:
    return dataclasses.replace(example, weights=[w * factor for w in example.weights])


class StageBuilder:
    """Builds a method's training examples for any stage, caching tokenization across stages.

    Args:
        method: the method.
        examples: training examples (one rationale each; examples without steps are trained on
            the answer only under every method).
        tokenizer, kind, fmt: the student's tokenizer, ``causal`` or ``seq2seq``, the prompt format.
        weights: ``weights.jsonl`` rows by rationale key (needed when ``method.token_weights``).
        inputs: the schedule's c_i(t) by rationale key, one entry per stage 0..T (needed when
            ``method.progressive``); stages past the last entry use the last (zeros).
        step_by_step_alpha: the rationale task's weight for ``step-by-step``.
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
        inputs: Mapping[str, Sequence[int]] | None = None,
        step_by_step_alpha: float = 1.0,
    ) -> None:
        from kpod.errors import ConfigError

        self.method = method
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.kind = kind
        self.fmt = fmt or PromptFormat()
        self.weights = weights or {}
        self.inputs = inputs or {}
        self.alpha = step_by_step_alpha
        self._cache: dict[tuple[int, int, str], StageExample] = {}
        keys = [rationale_key(e) for e in self.examples if e.steps]
        if method.token_weights and method.rationale:
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
        self.keys = [rationale_key(e) for e in self.examples]

    def n_input_steps(self, index: int, stage: int) -> int:
        """c_i(t): leading steps of rationale ``index`` given as input at ``stage``."""
        if not self.method.progressive:
            return 0
        row = self.inputs.get(self.keys[index])
        if not row:
            return 0
        return int(row[min(stage, len(row) - 1)])

    def _build(self, index: int, c: int, task: str) -> StageExample:
        cache_key = (index, c, task)
        if cache_key not in self._cache:
            e = self.examples[index]
            row = self.weights.get(self.keys[index]) if self.method.token_weights else None
            if task == "label" or not self.method.rationale or not e.steps:
                prefix = LABEL_PREFIX if task == "label" else ""
                built = build_stage_example(
                    _without_rationale(e, prefix), 0, self.tokenizer, kind=self.kind, fmt=self.fmt
                )
            elif task == "rationale":
                source = dataclasses.replace(e, question=RATIONALE_PREFIX + e.question)
                built = _scaled(
                    build_stage_example(source, 0, self.tokenizer, kind=self.kind, fmt=self.fmt), self.alpha
                )
            else:
                built = build_stage_example(
                    e, c, self.tokenizer, kind=self.kind, fmt=self.fmt, weights_row=row
                )
            self._cache[cache_key] = built
        return self._cache[cache_key]

    def stage(self, stage: int) -> list[StageExample]:
        """Every training example of ``stage``, in data order."""
        out: list[StageExample] = []
        for i in range(len(self.examples)):
            if self.method.multitask:
                out.append(self._build(i, 0, "label"))
                if self.examples[i].steps:
                    out.append(self._build(i, 0, "rationale"))
            else:
                out.append(self._build(i, self.n_input_steps(i, stage), "main"))
        return out
