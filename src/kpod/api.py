"""The Python API: what `kpod run` and the subcommands do, callable from a notebook.

::

    import kpod

    config = kpod.load_config("configs/quickstart.yaml", ["train.epochs=2"])
    run = kpod.run(config)                 # every step, resumable, like `kpod run`
    run.results["kpod"]["accuracy"]        # test accuracy (%) of each method, "untrained" included
    run.report                             # the HTML report's path

    # one step alone, on objects rather than files
    examples, _ = kpod.load_examples("train.jsonl")
    weights = kpod.load_weights("runs/quickstart/weights")          # TokenWeights by rationale key
    result = kpod.distill_student(config.train, config.student, examples, Path("x"), weights=weights)

These are the functions the CLI calls (:mod:`kpod.pipeline`): one implementation per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpod.pipeline import PipelineConfig


@dataclass
class RunResult:
    """What :func:`run` returns: the run directory, each method's test summary (accuracy in %,
    its 95 % interval, counts; ``None`` for a method without a test split) and the report's path."""

    directory: Path
    results: dict[str, dict[str, Any] | None]
    report: Path


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> PipelineConfig:
    """A `kpod run` YAML config with ``key=value`` overrides, validated (errors name the key)."""
    from kpod.pipeline import load_pipeline_config

    return load_pipeline_config(path, list(overrides))


def run(config: PipelineConfig | str | os.PathLike[str], *, echo: Callable[[str], None] = print) -> RunResult:
    """Run the whole pipeline of ``config`` (a loaded config or a YAML path) as `kpod run` does:
    finished steps are skipped, a changed setting re-runs its step and what follows, and the run
    directory's writer lock is held throughout."""
    from kpod.config import to_dict
    from kpod.pipeline import run_pipeline

    source = None
    if not isinstance(config, PipelineConfig):
        source = str(config)
        config = load_config(config)
    out = run_pipeline(config, {"file": source, "overrides": [], "resolved": to_dict(config)}, echo)
    return RunResult(directory=config.directory, results=out["results"], report=Path(out["report"]))
