"""Planning the whole in-rationale schedule c_i(t) ahead of training (paper Algorithm 1).

c_i(t) is the number of leading steps of question i given as *input* at stage t; the student
generates the remaining n_i - c_i(t) steps and the answer. Stage t = epoch t.

Start (the paper does not say how the initial difficulty reaches C0; we take option (A) of the
digest): every question starts with c_i = n_i (only the answer is generated, H = 0); then the
stage-0 selection is repeated with budget C0 - H, each pass moving the chosen questions Delta_s
steps into the output, until a pass selects nothing or the budget is met.

Stage t = 1 .. T-1: Delta D(t) = D(t) - H(t-1) (Eq. 11), S(t) = select_stage(...) over the questions
with c_i > 0, each moves Delta_s steps; so Delta H <= Delta D always holds.

Stage t >= T: every question is trained on its full rationale (c_i = 0), as Algorithm 1 forces.

Several rationales per question (our choice; the paper has one): the schedule is planned per
*rationale*. Each rationale is a row with its own steps, difficulties and c_i(t), keyed by
:func:`kpod.weighting.weights.rationale_key`; the rationales of one question share its question
embedding, hence its cluster, so the diversity term treats them as one kind of question. Per
question would force one c on rationales of different lengths and difficulties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from kpod.errors import ConfigError
from kpod.progressive.maths import difficulty_budget, select_stage


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule hyper-parameters (paper App. A defaults).

    Attributes:
        stages: T, the stage by which every question is on its full rationale; ``null`` (the
            default): half of ``train.epochs``, the paper's ratio. Epoch t trains stage t
            (t = 1..T); T larger than the epochs is refused, since the student would never train
            on a whole rationale.
        p: pacing exponent (0.5).
        initial_fraction: C0 / B (0.3).
        beta: diversity weight (12); 0 is the "w/o div" ablation.
        n_clusters: K (5).
        step_size: Delta_s, steps moved per selection (1; not given in the paper).
    """

    stages: int | None = None
    p: float = 0.5
    initial_fraction: float = 0.3
    beta: float = 12.0
    n_clusters: int = 5
    step_size: int = 1

    def __post_init__(self) -> None:
        if (
            (self.stages is not None and self.stages < 1)
            or self.step_size < 1
            or self.n_clusters < 1
            or self.beta < 0
        ):
            raise ConfigError(f"bad schedule settings: {self}")
        if not 0 <= self.initial_fraction <= 1:
            raise ConfigError(f"initial_fraction (C0 / B) must be in [0, 1], got {self.initial_fraction}")


@dataclass(frozen=True)
class DifficultyConfig:
    """Step difficulty scoring and question clustering (paper section 3.4).

    Attributes:
        batch_size: scoring batch size.
        cluster_encoder: a sentence-embedding model for the clusters (``null``: the student's
            mean input embedding, offline).
        precision: the scoring forward passes in ``bf16`` (autocast, as training steps run),
            ``fp32``, or ``auto`` (default: bf16 where its products are fast, fp32 elsewhere, as
            ``train.precision``; :func:`kpod.precision.compute_precision`). The log-probabilities
            are float32 either way; bf16 moves the difficulties by rounding (Pearson 0.9999 on the
            quickstart's) and scored 1.7x faster on a CPU with bf16 matrix units (BENCHMARKS.md,
            "Issue #21, session 27").
    """

    batch_size: int = 8
    cluster_encoder: str | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class Schedule:
    """c[i, t] for t = 0 .. T (column T is all zeros), with per-stage facts for reports.

    ``n_steps``: each row's number of steps (empty for schedules written before it was recorded),
    which says what share of the rationales a stage gives as input (:meth:`exposure`)."""

    c: np.ndarray
    budget: list[float]
    achieved: list[float]
    advanced: list[int]
    cluster_counts: list[list[int]]
    total_difficulty: float
    config: ScheduleConfig
    clusters: list[int] = field(default_factory=list)
    n_steps: list[int] = field(default_factory=list)

    def exposure(self) -> dict[str, list[float] | float]:
        """What the curriculum withholds from training, for reports: per stage the share of all
        steps given as input (``input_share``) and the share of rationales generated whole
        (``whole_share``), and ``first_step_share``, the share of stages 1..T in which a
        rationale's first step is generated (mean over rationales; 1 for std-cot). The first step
        is the one the curriculum trains least: it is output only once c_i(t) reaches 0. The
        epochs after T train every step. Needs ``n_steps``."""
        if len(self.n_steps) != len(self.c):
            raise ValueError("this schedule does not record its rationales' step counts")
        total = max(1, int(np.sum(self.n_steps)))
        whole = self.c == 0
        return {
            "input_share": (self.c.sum(axis=0) / total).tolist(),
            "whole_share": whole.mean(axis=0).tolist(),
            "first_step_share": float(whole[:, 1:].mean()) if self.c.shape[1] > 1 else 1.0,
        }

    def stage_inputs(self, keys: Sequence[str]) -> StageInputs:
        """c_i(t) of the schedule's rationales, ``keys[i]`` naming row i."""
        return StageInputs({key: row.tolist() for key, row in zip(keys, self.c, strict=True)})

    def to_dict(self) -> dict:
        return {
            "c": self.c.tolist(),
            "budget": self.budget,
            "achieved": self.achieved,
            "advanced": self.advanced,
            "cluster_counts": self.cluster_counts,
            "total_difficulty": self.total_difficulty,
            "config": asdict(self.config),
            "clusters": self.clusters,
            "n_steps": self.n_steps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(
            c=np.asarray(d["c"], dtype=np.int64),
            budget=d["budget"],
            achieved=d["achieved"],
            advanced=d["advanced"],
            cluster_counts=d["cluster_counts"],
            total_difficulty=d["total_difficulty"],
            config=ScheduleConfig(**d["config"]),
            clusters=d.get("clusters", []),
            n_steps=d.get("n_steps", []),
        )


def output_difficulty(difficulties: Sequence[np.ndarray], c: np.ndarray) -> float:
    """Eq. (9) summed over questions: H = sum_i sum_{j > c_i} d_ij."""
    return float(sum(d[int(ci) :].sum() for d, ci in zip(difficulties, c, strict=True)))


def _prefix_sums(difficulties: Sequence[np.ndarray]) -> np.ndarray:
    """prefix[i, c] = sum of the first c step difficulties of question i (rows zero-padded)."""
    longest = max((len(d) for d in difficulties), default=0)
    prefix = np.zeros((len(difficulties), longest + 1))
    for i, d in enumerate(difficulties):
        prefix[i, 1 : len(d) + 1] = np.cumsum(d)
        prefix[i, len(d) + 1 :] = prefix[i, len(d)]
    return prefix


def plan_schedule(
    difficulties: Sequence[Sequence[float]],
    clusters: Sequence[int],
    config: ScheduleConfig = ScheduleConfig(),
) -> Schedule:
    """The whole schedule (Algorithm 1, lines 4-5) from per-step difficulties and clusters."""
    diffs = [np.maximum(np.asarray(d, dtype=np.float64), 0.0) for d in difficulties]
    if len(diffs) != len(clusters):
        raise ValueError("one cluster per question is needed")
    n_steps = np.array([len(d) for d in diffs], dtype=np.int64)
    total = float(sum(d.sum() for d in diffs))
    initial = config.initial_fraction * total
    clusters_arr = np.asarray(clusters, dtype=np.int64)
    if config.stages is None:
        raise ConfigError("schedule.stages (T) is not set; it defaults to half of train.epochs in `kpod run`")
    T = config.stages
    c = np.zeros((len(diffs), T + 1), dtype=np.int64)
    state = n_steps.copy()
    prefix = _prefix_sums(diffs)
    rows = np.arange(len(diffs))
    totals = prefix[rows, n_steps]

    def difficulty_of(state: np.ndarray) -> float:  # Eq. (9), vectorised
        return float((totals - prefix[rows, state]).sum())

    budget, achieved, advanced, counts = [], [], [], []

    def run_selection(limit: float) -> np.ndarray:
        eligible = np.flatnonzero(state > 0)
        c_now = state[eligible]
        gains = prefix[eligible, c_now] - prefix[eligible, np.maximum(c_now - config.step_size, 0)]
        if eligible.size == 0:
            return eligible
        chosen = select_stage(
            gains.tolist(), clusters_arr[eligible].tolist(), limit, config.beta, config.n_clusters
        )
        picked = eligible[chosen]
        state[picked] = np.maximum(state[picked] - config.step_size, 0)
        return picked

    # Stage 0: reach C0 from "answer only" by repeated passes.
    moved_total = np.zeros(len(diffs), dtype=bool)
    h = 0.0
    while True:
        picked = run_selection(initial - h)
        if picked.size == 0:
            break
        moved_total[picked] = True
        h = difficulty_of(state)
        if h >= initial - 1e-9:
            break
    c[:, 0] = state
    budget.append(initial)
    achieved.append(h)
    advanced.append(int(moved_total.sum()))
    counts.append(np.bincount(clusters_arr[moved_total], minlength=config.n_clusters).tolist())
    for t in range(1, T):
        d_t = difficulty_budget(t, total, initial, T, config.p)
        picked = run_selection(d_t - h)
        h = difficulty_of(state)
        c[:, t] = state
        budget.append(d_t)
        achieved.append(h)
        advanced.append(int(picked.size))
        counts.append(np.bincount(clusters_arr[picked], minlength=config.n_clusters).tolist())
    # Stage T: the full rationale for everyone.
    budget.append(total)
    achieved.append(total)
    advanced.append(int((state > 0).sum()))
    counts.append(np.bincount(clusters_arr[state > 0], minlength=config.n_clusters).tolist())
    return Schedule(
        c=c,
        budget=budget,
        achieved=achieved,
        advanced=advanced,
        cluster_counts=counts,
        total_difficulty=total,
        config=config,
        clusters=clusters_arr.tolist(),
        n_steps=n_steps.tolist(),
    )


@dataclass(frozen=True)
class StageInputs:
    """c_i(t) by rationale key: how many leading steps of each rationale are input at stage t.

    The one reader of a planned schedule's c (the trainer's stage examples go through
    :meth:`n_input_steps`). Stages at or after T give zeros (the last column); a rationale the
    schedule does not hold is given no steps as input."""

    rows: Mapping[str, Sequence[int]]

    @classmethod
    def of(cls, inputs: StageInputs | Mapping[str, Sequence[int]] | None) -> StageInputs:
        """``inputs`` as a :class:`StageInputs` (a plain mapping of rows is wrapped; None is empty)."""
        return inputs if isinstance(inputs, StageInputs) else cls(dict(inputs or {}))

    @property
    def stages(self) -> int:
        """T: the last stage, from which every rationale is whole (0 for an empty schedule)."""
        return max((len(row) for row in self.rows.values()), default=1) - 1

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def n_input_steps(self, key: str, stage: int) -> int:
        """c_i(stage) of rationale ``key``."""
        row = self.rows.get(key)
        if not row:
            return 0
        return int(row[min(stage, len(row) - 1)])


def load_schedule_inputs(path: str | Path) -> StageInputs:
    """c_i(t) by rationale key from a ``schedule.json`` (or its directory), as the trainer reads them."""
    import json

    path = Path(path)
    path = path / "schedule.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no schedule at {path}; make one with `kpod schedule plan`")
    plan = json.loads(path.read_text(encoding="utf-8"))
    return StageInputs({key: row for key, row in zip(plan["keys"], plan["c"], strict=True)})
