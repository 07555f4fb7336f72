"""What the in-rationale curriculum trains, by a rationale's number of steps: over the kpod schedules of
a suite's seeds (``runs/bench/<suite>-<dataset>-s<seed>/schedule/schedule.json``, written by its kpod
runs on this machine), per step count the rationales, the epochs in which a rationale's first step is
an output (std-cot: every epoch), and the share of its steps that are outputs, averaged over epochs.

    .venv/bin/python benchmarks/curriculum.py --suite cpu-multistep

Epoch e (from 0) trains stage min(e + 1, T) (:mod:`kpod.distill.trainer`); stage T gives every
rationale whole, and so do the epochs after it. The paper's curriculum is meant to start with the
steps that are easiest to generate (the last ones, given the rest); what it costs is the epochs in
which the first steps are not trained. Writes ``benchmarks/results/curriculum.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402


def epoch_stages(epochs: int, stages: int) -> np.ndarray:
    """The schedule's stage each epoch trains (:func:`kpod.distill.trainer.schedule_stage`), stage T
    (``stages``) for the epochs after it."""
    from kpod.distill.trainer import schedule_stage

    return np.minimum([schedule_stage(e) for e in range(epochs)], stages)


def epoch_exposure(c: np.ndarray, n_steps: np.ndarray, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rationale i, from c_i(t) (steps given as input at stage t = 0..T, the schedule's ``c``):
    the number of epochs whose stage makes its first step an output (c_i = 0), and the share of its
    steps that are outputs, averaged over the ``epochs`` epochs."""
    given = c[:, epoch_stages(epochs, c.shape[1] - 1)]
    n = np.asarray(n_steps, dtype=float)[:, None]
    return (given == 0).sum(axis=1), ((n - given) / n).mean(axis=1)


def by_steps(c: np.ndarray, n_steps: np.ndarray, epochs: int) -> dict[int, dict[str, float]]:
    """:func:`epoch_exposure` averaged over the rationales of each step count."""
    first, share = epoch_exposure(c, n_steps, epochs)
    n_steps = np.asarray(n_steps)
    return {
        int(k): {
            "rationales": int((n_steps == k).sum()),
            "epochs_first_step_output": float(first[n_steps == k].mean()),
            "share_of_steps_output": float(share[n_steps == k].mean()),
        }
        for k in sorted(set(n_steps.tolist()))
    }


def _steps_from_difficulty(folder: Path, schedule: dict) -> list[int]:
    """Step counts of a schedule written before it recorded them: the number of per-step
    difficulties of each of its rationales in the ``difficulty.jsonl`` beside it."""
    from kpod.progressive.difficulty import read_difficulties

    difficulties = read_difficulties(folder / "difficulty.jsonl")
    return [len(difficulties[key]) for key in schedule["keys"]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cpu-multistep")
    args = parser.parse_args()
    from accuracy import SUITES, run_config

    spec = SUITES[args.suite]
    out = {"benchmark": "curriculum", **provenance(), "suite": args.suite, "datasets": {}}
    for dataset in spec["datasets"]:
        epochs = run_config(args.suite, dataset, "kpod", 0)["train"]["epochs"]
        c_all, n_all, seeds = [], [], []
        for seed in range(100):
            folder = Path(run_config(args.suite, dataset, "kpod", seed)["run_dir"]) / "schedule"
            if (folder / "schedule.json").is_file():
                schedule = json.loads((folder / "schedule.json").read_text())
                c_all.append(np.asarray(schedule["c"]))
                n_all.append(np.asarray(schedule.get("n_steps") or _steps_from_difficulty(folder, schedule)))
                seeds.append(seed)
        if not seeds:
            continue
        table = by_steps(np.concatenate(c_all), np.concatenate(n_all), epochs)
        out["datasets"][dataset] = {"epochs": epochs, "seeds": seeds, "by_steps": table}
        print(f"{args.suite} / {dataset}: {epochs} epochs, schedules of seeds {seeds}")
        print("steps  rationales  epochs with the first step an output  share of steps output")
        for k, row in table.items():
            print(
                f"{k:5d}  {row['rationales']:10d}  {row['epochs_first_step_output']:20.2f} of {epochs}"
                f"  {row['share_of_steps_output']:31.2f}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "curriculum.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {(RESULTS / 'curriculum.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
