"""The token weighting step's settings (``weighting:`` in a config, the options of `kpod weights
train`). Kept apart from the trainer so that reading a config or building the CLI needs no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from kpod.errors import ConfigError
from kpod.models import DEFAULT_STUDENT


@dataclass(frozen=True)
class WeightingExperiments:
    """Knobs of the mask-learning objective kept for experiments (``weighting.experimental:`` in a
    config; the same option names on the command line). No shipped config sets them; what each
    one did when measured is in BENCHMARKS.md ("Token weighting").

    Attributes:
        estimator: how the answer loss's gradient reaches ``w``. ``straight-through`` is Eq. (4)'s
            Gumbel-softmax relaxation (the paper's); ``score-function`` draws ``samples`` hard masks
            per rationale and uses REINFORCE with a leave-one-out baseline (default; see the module
            docstring, :func:`kpod.weighting.maths.score_function_surrogate` and BENCHMARKS.md).
        samples: masks per rationale for the score-function estimator.
        normalize_mask_loss: divide L_m by the rationale's length (default on). The paper prints
            the sum, a per-token push of alpha nats, more than masking one token usually costs a
            frozen predictor, so every weight is driven towards 0 (BENCHMARKS.md, token weighting).
            Used only without the kept-ratio budget.
        kept_budget: penalise only the kept tokens beyond this share of the rationale (a hinge, not
            in the paper; ``None``: Eq. 6). See :func:`kpod.weighting.maths.mask_ratio_loss`. Used
            only without the kept-ratio budget.
        tau: Gumbel-softmax temperature (straight-through estimator).
        tau_final: anneal the temperature linearly from ``tau`` to this value (``None``: constant).
        n_prefixes: rationale prefixes per example in L_p (the full one included).
        prefix_sum: estimate Eq. (5)'s sum over *all* prefixes from the sampled ones (weighting the
            shorter prefixes by n / (n_prefixes - 1)), which puts L_p on the scale of the printed,
            summed L_m. Off: L_p sums only the sampled prefixes.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9), for the module. The sparsity gradient is
            the same sign for every token while the answer gradient is noisy, and Adam normalises
            both; SGD follows gradient magnitudes instead, so a small alpha really is a small push.
    """

    estimator: Literal["straight-through", "score-function"] = "score-function"
    samples: int = 4
    normalize_mask_loss: bool = True
    kept_budget: float | None = None
    tau: float = 1.0
    tau_final: float | None = None
    n_prefixes: int = 2
    prefix_sum: bool = False
    optimizer: Literal["adamw", "sgd"] = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd, got '{self.optimizer}'")
        if self.estimator not in ("straight-through", "score-function"):
            raise ConfigError(f"estimator must be straight-through or score-function, got '{self.estimator}'")
        if self.estimator == "score-function" and self.samples < 2:
            raise ConfigError(f"the score-function estimator needs samples >= 2, got {self.samples}")
        if self.kept_budget is not None and not 0 <= self.kept_budget < 1:
            raise ConfigError(f"kept_budget must be in [0, 1), got {self.kept_budget}")
        if self.tau <= 0 or self.n_prefixes < 1:
            raise ConfigError(f"tau must be > 0 and n_prefixes >= 1, got {self.tau} and {self.n_prefixes}")


EXPERIMENTAL = tuple(f.name for f in fields(WeightingExperiments))


@dataclass(frozen=True)
class WeightingConfig:
    """Settings of the token weighting module and its training.

    Attributes:
        student: the student whose tokenizer and input embeddings the module uses.
        predictor: the answer predictor's model (``None``: the student's pretrained model).
        predictor_mode: ``frozen``, ``lora`` or ``full`` (see the module docstring for the default).
        target_keep: the kept-ratio budget (default 0.5; ``null``: off, the paper's objective with
            Eq. 6's sparsity term). Each rationale's weights are shifted to that mean
            (:func:`kpod.weighting.maths.budget_weights`), in training and in the weights written,
            so the answer loss decides which tokens stay and the weights spread by construction;
            the sparsity term (``alpha``) is then constant and not used. Not in the paper (see the
            README's departures; BENCHMARKS.md for the dual-ascent multiplier tried first).
        alpha: weight of the mask-ratio loss (Eq. 7) when ``target_keep`` is null; the paper's
            App. A says 0.5, its Fig. 3a peaks at 0.7.
        rescale, rescale_floor: how the trained weights enter step difficulty and the student's
            loss: ``none`` (default, the paper's raw w) or ``minmax`` per rationale onto
            [rescale_floor, 1] (not in the paper). ``weights.jsonl`` always holds the raw w; the
            consumers rescale. See :func:`kpod.weighting.maths.rescale_weights`. Kept here, not in
            the readers' sections, so that step difficulty and the student's loss cannot read the
            same weights two ways; they are not part of the weight training's cache key.
        max_steps: stop after this many optimiser steps (``None``: all epochs).
        epochs, batch_size, lr, predictor_lr: optimisation (AdamW unless
            ``experimental.optimizer`` says otherwise).
        max_rationale_tokens: longer rationales are truncated (their tail gets weight 1).
        precision: ``bf16`` autocast (CPU or GPU), ``fp32``, or ``auto`` (default: bf16 where
            its products are fast, fp32 elsewhere, as ``train.precision``;
            :func:`kpod.precision.compute_precision`).
        num_heads, mlp_hidden: the module's attention heads and MLP width.
        seed: seeds the module's initialisation, the masks and the prefixes drawn.
        device: where the module and the predictor run (``cpu``, ``cuda``).
        experimental: :class:`WeightingExperiments` (``weighting.experimental:``).
    """

    student: str = DEFAULT_STUDENT
    predictor: str | None = None
    predictor_mode: Literal["frozen", "lora", "full"] = "frozen"
    target_keep: float | None = 0.5
    alpha: float = 0.5
    rescale: Literal["none", "minmax"] = "none"
    rescale_floor: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    predictor_lr: float = 1e-4
    max_rationale_tokens: int = 256
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_heads: int = 4
    mlp_hidden: int = 256
    seed: int = 0
    device: str = "cpu"
    experimental: WeightingExperiments = field(default_factory=WeightingExperiments)

    # Keys that moved into ``experimental`` (config loading names the new key).
    moved_keys = {name: f"experimental.{name}" for name in EXPERIMENTAL}

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or null for every epoch), got {self.max_steps}")
        if self.predictor_mode not in ("frozen", "lora", "full"):
            raise ConfigError(f"predictor_mode must be frozen, lora or full, got '{self.predictor_mode}'")
        if self.target_keep is not None and not 0 < self.target_keep < 1:
            raise ConfigError(f"target_keep must be in (0, 1), got {self.target_keep}")
        if self.rescale not in ("none", "minmax"):
            raise ConfigError(f"rescale must be none or minmax, got '{self.rescale}'")
        if not 0 <= self.rescale_floor <= 1:
            raise ConfigError(f"rescale_floor must be in [0, 1], got {self.rescale_floor}")
        if self.alpha < 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"alpha must be >= 0, epochs and batch_size >= 1: {self}")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> WeightingConfig:
        """A config from :meth:`settings` (flat) or ``asdict`` (nested) output, e.g. a weights
        directory's ``config.json`` written before the experimental knobs had their section."""
        settings = dict(settings)
        nested = dict(settings.pop("experimental", {}))
        nested.update({k: settings.pop(k) for k in EXPERIMENTAL if k in settings})
        return cls(**settings, experimental=WeightingExperiments(**nested))

    def settings(self) -> dict[str, Any]:
        """Every setting in one flat mapping (the experimental ones beside the others)."""
        flat = asdict(self)
        flat.update(flat.pop("experimental"))
        return flat

    def training_settings(self) -> dict[str, Any]:
        """The settings that shape the trained weights: the weights stage's cache key (flat, so
        keys made before the ``experimental`` section existed still match). The rescale fields
        are left out (only the weights' readers use them), so changing them re-runs the schedule
        and the weighted training but not the weight training."""
        return {k: v for k, v in self.settings().items() if k not in READ_SETTINGS}

    def read_settings(self) -> dict[str, Any]:
        """How the weights are read (part of the keys of the stages that read them)."""
        return {k: getattr(self, k) for k in READ_SETTINGS}


READ_SETTINGS = ("rescale", "rescale_floor")
