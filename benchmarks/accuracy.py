"""Does KPOD beat standard CoT distillation here? One (suite, dataset, method, seed) per call, or the
whole suite in turn, each run writing one result JSON that later sittings never redo.

    .venv/bin/python benchmarks/accuracy.py --suite cpu-small --list          # runs and their status
    .venv/bin/python benchmarks/accuracy.py --suite cpu-small                 # every missing run, in order
    .venv/bin/python benchmarks/accuracy.py --suite cpu-small --dataset asdiv --method kpod --seed 1
    .venv/bin/python benchmarks/report.py                                      # tables for BENCHMARKS.md

Each run is a `kpod run` of the suite's config (stage caching shares data, token weights and
schedules between the methods of one dataset and seed: runs/bench/<suite>-<dataset>-s<seed>/), then
``results/accuracy/<suite>-<dataset>-<method>-s<seed>.json`` with the accuracy, its 95 % interval,
n, epochs, tokens seen, wall time, commit and the per-question correctness (for McNemar's test),
plus the dev accuracy after each epoch, the epoch kept, and the last epoch's test accuracy.

Same budget for every method of a suite: same data, epochs, batch, learning rate, precision and
evaluation. The seed changes the adapters' initialisation and the data order (and the token
weighting's sampling); the data split and the test questions stay fixed.

Suites (SmolLM2-135M-Instruct with LoRA on 2 CPU cores, each run about an hour, except ``gpu-7b``):
``cpu-multistep`` (issue #23's powered suite: gsm_symbolic templates with 3-5 step solutions, 8 epochs
with T = 4, 1,000 test questions and 500 of unseen templates, as many kpod / std-cot seed pairs as
the pilot pair's discordance asks for, at least 5), ``cpu-asdiv`` (ASDiv with the same epochs and
stages, the paper's baselines ``scotd`` and ``mcc-kd`` beside kpod and std-cot), ``cpu-small`` (the
first suite: 4 epochs, ASDiv and GSM8K, kept as it was run) and ``gpu-7b`` (the paper's setting, for
a GPU machine). Any config key can be changed for
a run with ``--set key=value`` (recorded in the result); give such a run a ``--tag`` so it keeps its
own run folder and result file (``...-kpod+minmax-s0.json``) and appears as its own row
(``kpod+minmax``) beside the suite's runs:

    .venv/bin/python benchmarks/accuracy.py --dataset asdiv --method kpod --seed 0 \
        --set weighting.rescale=minmax --tag minmax

On a CPU, ``--streams 2`` runs the missing runs as two processes side by side, each with
cores / 2 torch threads (one each on two cores: 1.17-1.23x the training tokens/s of one
two-thread process, BENCHMARKS.md "Issue #23, session 18"). Runs that share a run folder (the
methods of one dataset and seed) stay in one stream, in the suite's order; each child is the
one-run command above, its output in ``runs/bench/logs/``; with fewer groups of runs missing than
streams, fewer streams start, each with more threads. The thread count is in each result's
``machine`` line: it changes the order of bf16 sums, so a run's figures by a few questions, as a
seed does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, SittingClock, provenance  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

_COMMON_CPU = {
    "student": {"name": "smollm2-135m-instruct", "finetune": "lora", "lora_r": 16, "lora_alpha": 32},
    "weighting": {"max_steps": 40, "batch_size": 8},
    "schedule": {"stages": 2, "n_clusters": 5},  # T = epochs / 2, the paper's ratio
    "train": {
        "epochs": 4,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 5.0e-4,
        "precision": "bf16",
        "save_every": 50,  # a run killed at the end of a sitting loses at most 50 steps
        "eval_batch_size": 32,
        "eval_max_new_tokens": 200,
        "merge_lora": False,
        # The last epoch's model is also scored on test when the 60/40-question dev split keeps an
        # earlier one (since the ASDiv runs of session 5; their results have no ``last_epoch``).
        "test_last_epoch": True,
    },
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def asdiv_data(**settings) -> dict:
    """ASDiv with gpt-3.5 rationales: the shared train file and the 314-question test set."""
    return {
        "source": "file",
        "path": str(SHARED / "asdiv-gpt35" / "train.json"),
        "test_path": str(SHARED / "asdiv-gpt35" / "test.json"),
        "n_train": None,
        "n_test": None,
        **settings,
    }


def gsm8k_data(**settings) -> dict:
    """GSM8K's human rationales; the test set is the paper's 659-question split of the official one."""
    return {
        "source": "file",
        "path": str(SHARED / "gsm8k" / "train.jsonl"),
        "test_path": str(SHARED / "gsm8k" / "test.jsonl"),
        "paper_split": True,
        "n_test": None,
        **settings,
    }


# gsm_symbolic templates (reasoning-gym generator ids) for the multi-step suite (issue #23), as
# `benchmarks/gsm_symbolic_templates.py` chose them (results/gsm-symbolic-templates.json): the 33
# templates whose solutions have 3 to 5 steps and whose questions and solutions average at most 100
# tokens each, alternately assigned to training and to the out-of-distribution test set, so both
# halves span the same lengths and step counts.
MULTISTEP_TEMPLATES = (1, 9, 13, 28, 33, 40, 44, 48, 53, 62, 70, 75, 77, 82, 85, 91, 98)
OOD_TEMPLATES = (3, 12, 18, 31, 34, 41, 47, 51, 57, 67, 71, 76, 78, 84, 90, 93)


# The powered suites' schedule: 8 epochs with T = epochs / 2, and dev selection among the epochs
# T..8 for every method, so that std-cot and kpod choose among the same epochs and pay the same dev
# evaluations. Generation in batches of 128 (refilled as sequences end): evaluation is most of a
# run's time, and 128 decodes about twice as fast as 32 here (BENCHMARKS.md, "Issue #21, session 13").
# Training steps compiled (`train.compile`): 1.26-1.38x the eager loop here, paid in each run's
# first step (about five minutes cold, half a minute from inductor's cache; BENCHMARKS.md "Issue
# #21, sessions 14 and 20"); every run of
# the suites trains this way (the eager std-cot seed 0 of session 14 was set aside, not mixed in).
_COMMON_CPU_8_EPOCHS = _merge(
    _COMMON_CPU,
    {
        "schedule": {"stages": 4},
        "train": {"epochs": 8, "select_from_epoch": 4, "eval_batch_size": 128, "compile": True},
    },
)


def multistep_data(**settings) -> dict:
    """gsm_symbolic problems of the training templates: train and dev from seed 0, the test set of
    the same templates with new numbers from seed 10000 (questions also in training dropped)."""
    return {"source": "gsm-symbolic", "templates": list(MULTISTEP_TEMPLATES), "seed": 0, **settings}


SUITES: dict[str, dict] = {
    "cpu-multistep": {
        # 320 training questions (about 19 per template), 8 epochs, T = 4: about an hour a run here.
        "datasets": {
            "gsm-symbolic": {
                "data": multistep_data(n_train=320, n_dev=200, n_test=1000),
                "train": {"eval_max_new_tokens": 160},
            },
        },
        "base": _COMMON_CPU_8_EPOCHS,
        # A second test set: templates never trained on, scored with the kept model.
        "ood": {"templates": OOD_TEMPLATES, "n": 500, "seed": 20_000},
        # The pilot pair first; its discordance sizes the number of kpod / std-cot seed pairs
        # (planned_pairs: enough to detect 2 points with 80 % power, at least 5), which come next;
        # then the ablations' two seeds each.
        "runs": [
            ("gsm-symbolic", "std-cot", [0]),
            ("gsm-symbolic", "kpod", [0]),
            ("gsm-symbolic", "untrained", [0]),
        ],
        "after_pairs": [
            ("gsm-symbolic", "kpod-no-weights", [0, 1]),
            ("gsm-symbolic", "kpod-no-progressive", [0, 1]),
        ],
        "power": {"dataset": "gsm-symbolic", "gap": 2.0, "min_pairs": 5, "max_pairs": 12},
        "generation_precision": "bf16",
    },
    "cpu-asdiv": {
        # ASDiv with this wave's weights and stages: 8 epochs with T = 4 (the multi-step suite's
        # ratio), 400 training questions so that a run stays near an hour; the paper's baselines
        # (several gpt-3.5 rationales per question) beside kpod and std-cot.
        "datasets": {"asdiv": {"data": asdiv_data(n_train=400, n_dev=100, rationales_per_question=1)}},
        "base": _COMMON_CPU_8_EPOCHS,
        "runs": [
            ("asdiv", "std-cot", [0]),
            ("asdiv", "kpod", [0]),
            ("asdiv", "untrained", [0]),
            ("asdiv", "std-cot", [1]),
            ("asdiv", "kpod", [1]),
            ("asdiv", "std-cot", [2]),
            ("asdiv", "kpod", [2]),
            ("asdiv", "scotd", [0, 1]),
            ("asdiv", "mcc-kd", [0, 1]),
            ("asdiv", "kpod-no-weights", [0]),
            ("asdiv", "kpod-no-progressive", [0]),
        ],
        "generation_precision": "bf16",
    },
    "cpu-small": {
        "datasets": {
            "asdiv": {
                "data": asdiv_data(n_train=600, n_dev=60, rationales_per_question=1),
            },
            "gsm8k": {
                "data": gsm8k_data(n_train=600, n_dev=40),
                "train": {"eval_max_new_tokens": 256},
            },
        },
        "base": _COMMON_CPU,
        # (dataset, method, seeds): std-cot and kpod 3 seeds on ASDiv and 2 on GSM8K; ablations once.
        "runs": [
            ("asdiv", "untrained", [0]),
            ("asdiv", "std-cot", [0]),
            ("asdiv", "kpod", [0]),
            ("asdiv", "std-cot", [1]),
            ("asdiv", "kpod", [1]),
            ("asdiv", "std-cot", [2]),
            ("asdiv", "kpod", [2]),
            ("asdiv", "kpod-no-weights", [0]),
            ("asdiv", "kpod-no-progressive", [0]),
            ("gsm8k", "untrained", [0]),
            ("gsm8k", "std-cot", [0]),
            ("gsm8k", "kpod", [0]),
            ("gsm8k", "std-cot", [1]),
            ("gsm8k", "kpod", [1]),
            ("gsm8k", "kpod-no-weights", [0]),
            ("gsm8k", "kpod-no-progressive", [0]),
        ],
    },
    "gpu-7b": {
        "datasets": {
            "asdiv": {
                "data": asdiv_data(n_dev=100, rationales_per_question=1),
                "train": {"epochs": 40},
                "schedule": {"stages": 20},
            },
            "gsm8k": {
                "data": gsm8k_data(n_train=None, n_dev=100),
                "train": {"epochs": 20},
                "schedule": {"stages": 10},
            },
        },
        "base": {
            "student": {"name": "huggyllama/llama-7b", "finetune": "lora", "lora_r": 64, "lora_alpha": 128},
            "weighting": {"alpha": 0.5, "epochs": 3, "device": "cuda"},
            "schedule": {"n_clusters": 5},
            "train": {
                "batch_size": 4,
                "micro_batch_size": 4,
                "lr": 1.0e-5,
                "precision": "bf16",
                "eval_batch_size": 64,
                "eval_max_new_tokens": 320,
                "test_last_epoch": True,
            },
        },
        "runs": [
            (d, m, s)
            for d in ("asdiv", "gsm8k")
            for m, s in (
                ("untrained", [0]),
                ("std-cot", [0, 1, 2]),
                ("kpod", [0, 1, 2]),
                ("kpod-no-weights", [0]),
                ("kpod-no-progressive", [0]),
            )
        ]
        + [("asdiv", m, [0, 1, 2]) for m in ("scotd", "mcc-kd")],
    },
}


def _suffix(tag: str | None) -> str:
    return f"+{tag}" if tag else ""


# cpu-small's list stays as it was run; the baselines run in cpu-asdiv (issue #23).
# The baselines that learn from several rationales per question (the paper's SCoTD and MCC-KD) get
# up to three per question where the data set has them (ASDiv's gpt-3.5 release), on the same
# questions as the other methods (data.n_train counts questions); their data differ, so they get
# a run folder of their own.
SEVERAL_RATIONALES = {"scotd", "mcc-kd"}
RATIONALES_PER_QUESTION = {"asdiv": 3}


def run_config(suite: str, dataset: str, method: str, seed: int, tag: str | None = None) -> dict:
    spec = SUITES[suite]
    data = _merge(spec["base"], spec["datasets"][dataset])
    several = method in SEVERAL_RATIONALES and dataset in RATIONALES_PER_QUESTION
    if several:
        data["data"] = {**data["data"], "rationales_per_question": RATIONALES_PER_QUESTION[dataset]}
    data["name"] = f"{suite}-{dataset}{'-multi' if several else ''}-s{seed}{_suffix(tag)}"
    data["run_dir"] = str(ROOT / "runs" / "bench" / data["name"])
    data["methods"] = ["std-cot"] if method == "untrained" else [method]
    data["eval_untrained"] = method == "untrained"
    data["train"] = {**data.get("train", {}), "seed": seed}
    data["weighting"] = {**data.get("weighting", {}), "seed": seed}
    return data


def result_path(suite: str, dataset: str, method: str, seed: int, tag: str | None = None) -> Path:
    return RESULTS / "accuracy" / f"{suite}-{dataset}-{method}{_suffix(tag)}-s{seed}.json"


def planned_pairs(suite: str) -> int | None:
    """Seed pairs of kpod and std-cot a suite with a ``power`` entry runs: enough for the pooled
    McNemar test to detect ``gap`` points with 80 % power at the discordance of its pilot pair
    (seed 0), at least ``min_pairs`` and at most ``max_pairs``; ``min_pairs`` while the pilot pair
    is not done. ``None`` for suites without one."""
    power = SUITES[suite].get("power")
    if power is None:
        return None
    dataset = power["dataset"]
    pilot = [result_path(suite, dataset, m, 0) for m in ("kpod", "std-cot")]
    if not all(p.exists() for p in pilot):
        return power["min_pairs"]
    from kpod.stats import mcnemar_pairs_needed

    kpod, std = (json.loads(p.read_text())["per_question"] for p in pilot)
    common = set(kpod) & set(std)
    discordant = sum(kpod[q] != std[q] for q in common)
    if not discordant:
        return power["min_pairs"]
    needed = mcnemar_pairs_needed(power["gap"] / 100, discordant / len(common), len(common))
    return min(power["max_pairs"], max(power["min_pairs"], needed))


def all_runs(suite: str) -> list[tuple[str, str, int]]:
    runs = [(d, m, s) for d, m, seeds in SUITES[suite]["runs"] for s in seeds]
    pairs = planned_pairs(suite)
    if pairs is not None:  # the seed pairs the pilot's power calls for, after the suite's own list
        dataset = SUITES[suite]["power"]["dataset"]
        runs += [
            (dataset, m, s) for s in range(pairs) for m in ("std-cot", "kpod") if (dataset, m, s) not in runs
        ]
    return runs + [(d, m, s) for d, m, seeds in SUITES[suite].get("after_pairs", []) for s in seeds]


def _last_epoch(test_last: dict | None) -> dict | None:
    if not test_last:
        return None
    return {
        "accuracy": test_last["accuracy"],
        "ci95": test_last["ci95"],
        "per_question": dict(zip(test_last["qids"], test_last["per_question"], strict=True)),
    }


def test_examples(test_path: Path) -> list:
    """A run's test questions with their reference steps (its ``data/test.jsonl``)."""
    from kpod.data.loaders import load_examples

    return load_examples(test_path, "kpod")[0]


def read_predictions(folder: Path) -> list[dict]:
    """A run's test predictions, as its evaluation recorded them."""
    return [json.loads(line) for line in (folder / "test_predictions.jsonl").read_text().splitlines()]


def write_result(path: Path, result: dict) -> None:
    """A result file, replaced whole (never left half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def question_info(examples: list) -> dict[str, dict]:
    """Per test question: its number of solution steps where it has a reference solution (ASDiv's
    test set has answers only), and its template where it has one."""
    info = {}
    for example in examples:
        row = {"steps": len(example.steps)} if example.steps else {}
        template = example.provenance.get("template")
        if template is not None:
            row["template"] = str(template)
        info[example.qid] = row
    return info


def score_ood(spec: dict, config, model_dir: str | None, folder: Path) -> dict:
    """The kept model (``model_dir``; the untrained student when ``None``) on the suite's
    out-of-distribution set: gsm_symbolic problems of templates never trained on. Resumable (the
    generations are recorded batch by batch, keyed by the model's weights)."""
    from kpod.data.synthetic import gsm_symbolic_examples
    from kpod.distill.methods import get_method
    from kpod.evaluate import evaluate, weights_fingerprint
    from kpod.models import load_model
    from kpod.prompt import PromptFormat

    examples, _ = gsm_symbolic_examples(spec["n"], seed=spec["seed"], templates=spec["templates"])
    loaded = load_model(model_dir or config.student.name, trainable=False)
    prefix = get_method(config.methods[0]).eval_prefix if model_dir else ""
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        examples,
        kind=loaded.kind,
        fmt=PromptFormat(style=config.student.prompt_style),
        batch_size=config.train.eval_batch_size,
        max_new_tokens=config.train.eval_max_new_tokens,
        out=folder / "ood_predictions.jsonl",
        question_prefix=prefix,
        resume_key=weights_fingerprint(loaded.model),
        precision=config.train.eval_precision,
    )
    templates = {e.qid: str(e.provenance.get("template")) for e in examples}
    return {
        **result.summary(),
        "templates": [str(t) for t in spec["templates"]],
        "per_question": {p["qid"]: bool(p["correct"]) for p in result.predictions},
        "question_template": templates,
    }


def arithmetic(predictions: list[dict]) -> dict:
    """The equations of numbers only that a run's test generations write
    (:func:`kpod.data.answers.written_equations`): how many, how many with a wrong result, and how
    many questions have at least one. KPOD weights numbers and operators most; this says whether
    its students compute better, whatever their final answers."""
    from kpod.data.answers import written_equations

    written = wrong = questions = 0
    for p in predictions:
        equations = written_equations(p.get("generated") or "")
        slips = sum(not e.correct for e in equations)
        written, wrong, questions = written + len(equations), wrong + slips, questions + (slips > 0)
    return {
        "equations": written,
        "wrong": wrong,
        "questions_with_slip": questions,
        "questions": len(predictions),
    }


def first_missing_steps(predictions: list[dict], examples: list) -> dict[str, int | None]:
    """Per test question, the first reference step whose result the generation never writes
    (:func:`kpod.data.steps.first_missing_step`; ``None``: it writes them all); questions without a
    reference solution are left out. The in-rationale curriculum trains the last steps longest, so
    its students should depart from the reference earlier, if anywhere."""
    from kpod.data.steps import first_missing_step

    steps = {e.qid: [s.text for s in e.steps] for e in examples if e.steps}
    return {
        p["qid"]: first_missing_step(steps[p["qid"]], p.get("generated") or "")
        for p in predictions
        if p["qid"] in steps
    }


def predictions_folder(suite: str, dataset: str, method: str, seed: int, tag: str | None = None) -> Path:
    """Where a run's test predictions are: its method's training folder, or the untrained
    evaluation's."""
    run_dir = Path(run_config(suite, dataset, method, seed, tag)["run_dir"])
    return run_dir / ("eval-untrained" if method == "untrained" else f"train-{method}")


def backfill(path: Path, folder: Path, test_file: Path) -> list[str]:
    """Add the figures computed from a finished run's saved predictions (``arithmetic``,
    ``first_missing_step``) to its result file where it lacks them (runs recorded before they
    existed); returns the keys added, none when the file has them or the predictions are not on
    this machine."""
    result = json.loads(path.read_text())
    missing = [k for k in ("arithmetic", "first_missing_step") if k not in result]
    if not missing or not (folder / "test_predictions.jsonl").exists():
        return []
    predictions = read_predictions(folder)
    if {p["qid"] for p in predictions} != set(result["per_question"]):
        raise SystemExit(
            f"{folder / 'test_predictions.jsonl'} is not the run recorded in {path}: its questions differ"
        )
    if "arithmetic" in missing:
        result["arithmetic"] = arithmetic(predictions)
    if "first_missing_step" in missing:
        result["first_missing_step"] = first_missing_steps(predictions, test_examples(test_file))
    write_result(path, result)
    return missing


def _weights_metrics(method: str, manifest: dict) -> dict | None:
    from kpod.distill.methods import get_method

    if method == "untrained" or not get_method(method).needs_weights:
        return None
    return (manifest["stages"].get("weights") or {}).get("result")


def run_one(
    suite: str, dataset: str, method: str, seed: int, overrides: list[str], tag: str | None = None
) -> dict:
    import dataclasses

    from kpod.config import apply_overrides, to_dict
    from kpod.pipeline import Runner, pipeline_config, run_pipeline

    started = provenance()
    data = apply_overrides(run_config(suite, dataset, method, seed, tag), overrides)
    config = pipeline_config(data)
    # Wall time over every sitting of this run (a run cut by a session's end resumes in the next).
    clock = SittingClock(Path(config.run_dir) / f"wall-{method}.json")
    if method == "untrained":
        # Only the data and the untrained evaluation: no training stage.
        config = dataclasses.replace(config, methods=("std-cot",))
        runner = Runner(config, to_dict(config))
        from kpod.pipeline import eval_untrained_step, run_data_step

        run_data_step(runner, config)
        eval_settings = {"student": config.student, "max_new_tokens": config.train.eval_max_new_tokens}
        with clock:
            summary = runner.step(
                "eval-untrained",
                eval_settings,
                ["data"],
                lambda f: eval_untrained_step(config, runner.dir / "data" / "test.jsonl", f),
            )["test"]
        runner.save_manifest()
        folder = runner.dir / "eval-untrained"
        training = {"epochs": 0, "train_tokens": 0, "target_tokens": 0, "seconds": 0.0}
    else:
        with clock:
            out = run_pipeline(config, to_dict(config), echo=lambda line: print(line, flush=True))
        summary = out["results"][method]
        folder = Path(config.run_dir) / f"train-{method}"
        training = json.loads((folder / "training.json").read_text())
    ood = None
    if "ood" in SUITES[suite]:
        with clock:
            model_dir = None if method == "untrained" else str(folder / "student")
            ood = score_ood(SUITES[suite]["ood"], config, model_dir, folder)
    manifest = json.loads((Path(config.run_dir) / "manifest.json").read_text())
    stage_seconds = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    predictions = read_predictions(folder)
    examples = test_examples(Path(config.run_dir) / "data" / "test.jsonl")
    result = {
        **started,
        "suite": suite,
        "dataset": dataset,
        "method": method,
        "variant": tag or "",
        "seed": seed,
        "accuracy": summary["accuracy"],
        "ci95": summary["ci95"],
        "n": summary["n"],
        "correct": summary["correct"],
        "epochs": training["epochs"],
        "train_tokens": training["train_tokens"],
        "target_tokens": training["target_tokens"],
        "train_seconds": training["seconds"],
        "best_epoch": training.get("best_epoch"),
        "dev": training.get("dev"),
        "wall_seconds": clock.total_seconds,
        "sittings": len(clock.sittings),
        "stage_seconds": stage_seconds,
        "overrides": overrides,
        "config": to_dict(config),
        "per_question": {p["qid"]: bool(p["correct"]) for p in predictions},
        # Test accuracy of the last epoch's model (no dev selection): the same as above when the
        # selection kept the last epoch.
        "last_epoch": _last_epoch(training.get("test_last")),
        # Which extraction rule found each answer: "last" (the last number) or "none" mean the
        # student never stated an answer, mostly a generation that ran to the token limit.
        "answer_rules": dict(Counter(p.get("rule") or "none" for p in predictions)),
        # The test generations' written equations and how many are wrong.
        "arithmetic": arithmetic(predictions),
        # Per test question, the first reference step whose result the generation never writes.
        "first_missing_step": first_missing_steps(predictions, examples),
        # Solution steps (and template) of each test question, for accuracy by number of steps.
        "questions": question_info(examples),
        # The kept model on templates never trained on (suites with an ``ood`` set).
        "ood": ood,
        # The token weights this run trained with (methods that read them): the weights step's
        # metrics, contrast included.
        "weights": _weights_metrics(method, manifest),
    }
    write_result(result_path(suite, dataset, method, seed, tag), result)
    clock.reset()
    return result


def _under_fast_allocator() -> None:
    """Run again with jemalloc (or another fast allocator) preloaded where one is installed and none
    is loaded, as the kpod command does: glibc's heap slows a long CPU run (BENCHMARKS.md, "Memory
    allocator"); results are the same, and each result's ``machine`` names the allocator."""
    from kpod.allocator import restart_on_fast_allocator

    restart_on_fast_allocator([sys.executable, *sys.argv])


def pin_generation_precision(suite: str) -> str | None:
    """A suite's ``generation_precision``, set as ``KPOD_GENERATION_PRECISION`` for this process:
    ``eval_precision: auto`` measures which precision generates faster on the machine at hand, and
    a suite that runs over several sittings may land on machines that answer differently, so the
    powered suites fix it (bf16: the faster on every machine measured so far, BENCHMARKS.md) rather
    than score some runs in fp32 and some in bf16. Set through the environment, which ``auto``
    obeys, so that the runs' configs (and their steps' keys) stay as they were."""
    precision = SUITES[suite].get("generation_precision")
    if precision is not None:
        os.environ["KPOD_GENERATION_PRECISION"] = precision
    return precision


def stream_groups(suite: str, runs: list[tuple[str, str, int]], tag: str | None = None) -> list[list]:
    """The runs grouped by their run folder, groups and runs in the given order: runs that share a
    folder (one dataset and seed: data, weights and schedule made once) must not run side by side,
    since `kpod run` holds its folder for as long as it runs."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run_config(suite, *run, tag)["name"], []).append(run)
    return list(groups.values())


def stream_threads(cores: int, streams: int, groups: int) -> tuple[int, int]:
    """How many streams to start and the torch threads of each child: no more streams than groups
    of runs (a last group left alone gets every core, not ``cores / streams`` of them while the
    other cores idle), and ``cores // streams`` threads each, at least one."""
    streams = max(1, min(streams, groups))
    return streams, max(1, cores // streams)


def run_streams(groups: list[list], streams: int, launch) -> list[tuple[tuple, int]]:
    """Run ``groups`` in ``streams`` workers side by side: each worker takes the next group in
    order and runs its runs one after another with ``launch(run) -> exit code``. Returns each
    run's exit code, in the order they finished; a failed run (or a launch that raises: -1) does not
    stop its stream."""
    import threading

    pending = list(groups)
    finished: list[tuple[tuple, int]] = []
    guard = threading.Lock()

    def worker() -> None:
        while True:
            with guard:
                if not pending:
                    return
                group = pending.pop(0)
            for run in group:
                try:
                    code = launch(run)
                except Exception as error:  # noqa: BLE001 - a launch that raises fails its run, not its stream
                    print(f"== {run}: {type(error).__name__}: {error}", flush=True)
                    code = -1
                with guard:
                    finished.append((run, code))

    workers = [threading.Thread(target=worker) for _ in range(max(1, streams))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return finished


def launch_child(
    suite: str,
    overrides: list[str],
    tag: str | None,
    threads: int,
    redo: bool = False,
    logs: Path | None = None,
):
    """A function that runs one run as its own process (the one-run command line) with ``threads``
    torch threads, its output appended to ``<logs>/<suite>-<dataset>-<method>-s<seed>.log``
    (``runs/bench/logs`` by default)."""
    import subprocess

    logs = logs or ROOT / "runs" / "bench" / "logs"

    def launch(run: tuple[str, str, int]) -> int:
        dataset, method, seed = run
        command = [sys.executable, str(Path(__file__).resolve()), "--suite", suite]
        command += ["--dataset", dataset, "--method", method, "--seed", str(seed)]
        command += [f"--set={o}" for o in overrides] + ([f"--tag={tag}"] if tag else [])
        command += ["--redo"] if redo else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{suite}-{dataset}-{method}{_suffix(tag)}-s{seed}.log"
        print(f"== start {suite} {dataset} {method} seed {seed} ({threads} thread(s); log {log})", flush=True)
        with log.open("a") as out:
            code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        outcome = "done" if code == 0 else f"FAILED (exit {code})"
        print(f"== {outcome}: {dataset} {method} seed {seed}", flush=True)
        return code

    return launch


def main() -> None:
    _under_fast_allocator()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu-small")
    parser.add_argument("--dataset")
    parser.add_argument("--method")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--list", action="store_true", help="list the suite's runs and which are done")
    parser.add_argument("--redo", action="store_true", help="run again even if the result exists")
    parser.add_argument(
        "--backfill",
        action="store_true",
        help="add figures computed from saved predictions (arithmetic, first_missing_step) to "
        "finished runs' results that lack them, from their run folders; runs nothing",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--tag",
        type=lambda t: t if t.replace("-", "").replace("_", "").isalnum() else parser.error(f"bad tag {t!r}"),
        help="name of a variant run (with --set): its own run folder, result file and table row",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help="run the missing runs as this many processes side by side, cores / streams torch threads "
        "each (runs of one dataset and seed stay in one stream)",
    )
    args = parser.parse_args()
    if args.streams < 1:
        parser.error(f"--streams must be 1 or more, got {args.streams}")
    pin_generation_precision(args.suite)
    runs = [
        r
        for r in all_runs(args.suite)
        if (args.dataset is None or r[0] == args.dataset)
        and (args.method is None or r[1] == args.method)
        and (args.seed is None or r[2] == args.seed)
    ]
    if args.dataset and args.method and args.seed is not None and not runs:
        runs = [(args.dataset, args.method, args.seed)]  # a run outside the suite's list
    if args.streams > 1 and not (args.list or args.backfill):
        missing = [r for r in runs if args.redo or not result_path(args.suite, *r, args.tag).exists()]
        groups = stream_groups(args.suite, missing, args.tag)
        streams, threads = stream_threads(os.cpu_count() or 1, args.streams, len(groups))
        launch = launch_child(args.suite, args.set, args.tag, threads, args.redo)
        finished = run_streams(groups, streams, launch)
        failed = [run for run, code in finished if code != 0]
        print(
            f"== {len(finished) - len(failed)} of {len(missing)} runs done"
            + (f"; failed: {failed}" if failed else "")
        )
        sys.exit(1 if failed else 0)
    for dataset, method, seed in runs:
        path = result_path(args.suite, dataset, method, seed, args.tag)
        done = path.exists()
        if args.backfill:
            folder = predictions_folder(args.suite, dataset, method, seed, args.tag)
            added = backfill(path, folder, folder.parent / "data" / "test.jsonl") if done else []
            if added:
                print(f"{path.name}: added {', '.join(added)} from {folder}")
            continue
        if args.list:
            extra = f"{json.loads(path.read_text())['accuracy']:.2f} %" if done else "missing"
            print(f"{args.suite:<10} {dataset:<7} {method:<22} seed {seed}: {extra}")
            continue
        if done and not args.redo:
            print(f"skip {path.name} (done)")
            continue
        print(f"== {args.suite} {dataset} {method} seed {seed}", flush=True)
        result = run_one(args.suite, dataset, method, seed, args.set, args.tag)
        print(
            f"== {path.name}: {result['accuracy']:.2f} % {result['ci95']} in {result['wall_seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
