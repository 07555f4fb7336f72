"""Plots (PNG) for people who would rather look than read. The HTML run report comes with #7."""

from __future__ import annotations

from pathlib import Path

from kpod.progressive.schedule import Schedule


def plot_schedule(schedule: Schedule, path: Path) -> Path:
    """Budget D(t) against achieved difficulty, and questions advanced per stage by cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = np.arange(len(schedule.budget))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    total = schedule.total_difficulty or 1.0
    top.plot(stages, np.array(schedule.budget) / total, "o-", label="budget D(t) (Eq. 10)")
    top.plot(stages, np.array(schedule.achieved) / total, "s--", label="achieved difficulty H(t)")
    top.set_ylabel("difficulty / B")
    top.set_ylim(0, 1.05)
    top.legend(loc="lower right")
    top.set_title("In-rationale progressive schedule")
    counts = np.array(schedule.cluster_counts, dtype=float)
    bottom_acc = np.zeros(len(stages))
    for k in range(counts.shape[1]):
        bottom.bar(stages, counts[:, k], bottom=bottom_acc, label=f"cluster {k}")
        bottom_acc += counts[:, k]
    bottom.set_xlabel("stage t (epoch); stage 0 = start, stage T = full rationales")
    bottom.set_ylabel("rationales advanced")
    bottom.legend(ncol=min(5, counts.shape[1]), fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule_table(schedule: Schedule) -> str:
    """One line per stage: budget, achieved difficulty, questions advanced, cluster spread."""
    total = schedule.total_difficulty or 1.0
    lines = ["stage  budget/B  achieved/B  advanced  by cluster"]
    for t, (b, a, n, counts) in enumerate(
        zip(schedule.budget, schedule.achieved, schedule.advanced, schedule.cluster_counts, strict=True)
    ):
        lines.append(f"{t:5d}  {b / total:8.3f}  {a / total:10.3f}  {n:8d}  {counts}")
    return "\n".join(lines)
