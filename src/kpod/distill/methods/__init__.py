"""Methods as objects: KPOD, its ablations and the baselines, all trained by one loop.

A method (:class:`Method`) decides which training examples exist at each stage (epoch), how many
leading steps of each rationale are input, what weight each target token carries, and its loss:

==========================  ==========  =============  ============================================
method                      weights     progressive    notes
==========================  ==========  =============  ============================================
``kpod``                    learned     schedule       Eq. 15 with the planned c_i(t)
``std-cot``                 1           no             Eq. 1: the whole rationale every epoch
``answer-only``             1           no             no rationale: prompt -> answer phrase
``step-by-step``            1 / alpha   no             Hsieh et al. 2023, two tasks (its file)
``kpod-no-weights``         1           schedule       paper's "w.o.-sig" (weights out of the loss)
``kpod-no-progressive``     learned     no             paper's "w.o.-prog"
``kpod-no-diversity``       learned     schedule       schedule planned with beta = 0 ("w.o.-div")
``kpod-uniform-difficulty`` learned     schedule       Eq. 8 with uniform weights ("w.o.-sig-dif")
``scotd``                   1           no             Li et al. 2023: one rationale per question,
                                                       a new draw each epoch (its file)
``mcc-kd``                  1 / 2       no             Chen et al. 2023: two rationales per
                                                       question + answer consistency (its file)
==========================  ==========  =============  ============================================

The last two differ from ``kpod`` only in how the schedule is planned (:attr:`Method.diversity`,
:attr:`Method.weighted_difficulty`); the pipeline plans their schedule accordingly and the loop
treats them like ``kpod``.

``kpod-no-weights`` keeps the schedule planned with token-weighted difficulty: the paper's
"w.o.-sig" removes the weights from the distillation loss only, and "w.o.-sig-dif" is its own row.

Adding a method: a file in this package with a :class:`Method` subclass overriding
``stage_examples`` and/or ``loss``, and one line in :data:`METHODS` below.
"""

from __future__ import annotations

from kpod.distill.methods.answer_only import AnswerOnly
from kpod.distill.methods.base import Method, StudentShape
from kpod.distill.methods.mcc_kd import MCCKD
from kpod.distill.methods.scotd import SCoTD
from kpod.distill.methods.step_by_step import LABEL_PREFIX, StepByStep
from kpod.distill.stages import StageBuilder

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("kpod", token_weights=True, progressive=True),
        Method("std-cot"),
        AnswerOnly("answer-only"),
        StepByStep("step-by-step", eval_prefix=LABEL_PREFIX),
        Method("kpod-no-weights", token_weights=False, progressive=True),
        Method("kpod-no-progressive", token_weights=True, progressive=False),
        Method("kpod-no-diversity", token_weights=True, progressive=True, diversity=False),
        Method("kpod-uniform-difficulty", token_weights=True, progressive=True, weighted_difficulty=False),
        SCoTD("scotd"),
        MCCKD("mcc-kd"),
    )
}
METHOD_NAMES = tuple(METHODS)  # the built-in methods


def register(method: Method) -> Method:
    """Add ``method`` to the registry at run time (a notebook's own method); its name must be new.
    A method shipped with kpod is a line in :data:`METHODS` instead."""
    from kpod.errors import ConfigError

    if method.name in METHODS:
        raise ConfigError(f"a method named '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    from kpod.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "METHOD_NAMES", "Method", "StageBuilder", "StudentShape", "get_method", "register"]
