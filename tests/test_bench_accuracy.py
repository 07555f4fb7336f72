"""benchmarks/accuracy.py: every run of every suite is a valid `kpod run` config, with its own
folder and result file, so a suite started on another machine (gpu-7b) does not fail on a typo."""

from __future__ import annotations

import os

import pytest

from kpod.config import apply_overrides
from kpod.pipeline import pipeline_config


@pytest.fixture(scope="module")
def accuracy(load_benchmark):
    return load_benchmark("accuracy")


def test_every_run_of_every_suite_is_a_valid_config(accuracy):
    seen_dirs, seen_results = set(), set()
    for suite in accuracy.SUITES:
        for dataset, method, seed in accuracy.all_runs(suite):
            config = pipeline_config(accuracy.run_config(suite, dataset, method, seed))
            assert config.train.seed == seed and config.weighting.seed == seed
            assert config.weighting.student == config.student.name
            if method == "untrained":
                assert config.eval_untrained
            else:
                assert config.methods == (method,) and not config.eval_untrained
            # the methods of one (suite, dataset, seed) share a run folder (and its cached stages)
            seen_dirs.add(config.run_dir)
            path = accuracy.result_path(suite, dataset, method, seed)
            assert path not in seen_results
            seen_results.add(path)
        runs = accuracy.all_runs(suite)
        folders = {
            (d, s, m in accuracy.SEVERAL_RATIONALES and d in accuracy.RATIONALES_PER_QUESTION)
            for d, m, s in runs
        }
        assert len(folders) == len({d for d in seen_dirs if f"/{suite}-" in d})
    # SCoTD and MCC-KD learn from several rationales of the same questions.
    several = pipeline_config(accuracy.run_config("cpu-small", "asdiv", "mcc-kd", 0))
    single = pipeline_config(accuracy.run_config("cpu-small", "asdiv", "std-cot", 0))
    assert several.data.rationales_per_question == 3 and single.data.rationales_per_question == 1
    assert several.data.n_train == single.data.n_train and several.run_dir != single.run_dir


def test_the_suites_keep_one_budget_for_every_method(accuracy):
    for suite in accuracy.SUITES:
        budgets = {}
        for dataset, method, seed in accuracy.all_runs(suite):
            if method == "untrained":
                continue
            config = pipeline_config(accuracy.run_config(suite, dataset, method, seed))
            t = config.train
            budget = (t.epochs, t.batch_size, t.lr, t.precision, t.max_length, config.data.n_train)
            assert budgets.setdefault(dataset, budget) == budget, (suite, dataset, method, seed)


def test_a_tagged_variant_has_its_own_folder_and_result(accuracy):
    plain = accuracy.run_config("cpu-small", "asdiv", "kpod", 0)
    tagged = apply_overrides(
        accuracy.run_config("cpu-small", "asdiv", "kpod", 0, "minmax"), ["weighting.rescale=minmax"]
    )
    assert tagged["run_dir"] != plain["run_dir"] and tagged["run_dir"].endswith("-s0+minmax")
    assert pipeline_config(tagged).weighting.rescale == "minmax"
    assert accuracy.result_path("cpu-small", "asdiv", "kpod", 0, "minmax").name == (
        "cpu-small-asdiv-kpod+minmax-s0.json"
    )


def test_sitting_clock_sums_a_killed_sitting_and_the_resumed_one(load_benchmark, tmp_path):
    """A run killed mid-way (no clean exit) keeps its elapsed time up to the last tick; the resumed
    sitting adds its own, so a result's wall time is not just the last sitting's."""
    import json
    import subprocess
    import sys
    import time

    common = load_benchmark("common")
    path = tmp_path / "wall-kpod.json"
    killed = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); from common import SittingClock\n"
        "c = SittingClock(sys.argv[2], every=0.1).__enter__(); time.sleep(0.6); os._exit(9)\n"
    )
    bench = str(common.ROOT / "benchmarks")
    done = subprocess.run([sys.executable, "-c", killed, bench, str(path)])
    assert done.returncode == 9
    first = json.loads(path.read_text())["sittings"][0]["seconds"]
    assert 0.4 <= first <= 0.6  # the last tick before the kill, at most one interval short
    with common.SittingClock(path, every=0.1) as clock:
        time.sleep(0.3)
    assert len(clock.sittings) == 2
    second = clock.sittings[1]["seconds"]
    assert second >= 0.3
    total = clock.total_seconds
    assert total == round(first + second, 1)
    time.sleep(0.2)
    assert clock.total_seconds == total  # frozen at the exit, not counting what follows
    assert json.loads(path.read_text())["sittings"][1]["seconds"] == second
    clock.reset()
    assert not path.exists()


def test_powered_suites_pin_the_generation_precision(accuracy, monkeypatch, tiny_causal):
    """The powered suites decode in bf16 whatever machine a sitting lands on (``auto`` obeys the
    environment and measures nothing); a suite without the setting leaves ``auto`` to measure."""
    from kpod import precision
    from kpod.models import load_model

    monkeypatch.delenv("KPOD_GENERATION_PRECISION", raising=False)
    measured = []
    monkeypatch.setattr(precision, "time_generation", lambda m, b, **kw: measured.append(b) or 1.0)
    model = load_model(str(tiny_causal), trainable=False).model
    assert accuracy.pin_generation_precision("cpu-small") is None
    assert "KPOD_GENERATION_PRECISION" not in os.environ
    for suite in ("cpu-multistep", "cpu-asdiv"):
        assert accuracy.pin_generation_precision(suite) == "bf16"
        assert precision.resolve("auto", model, 128) == "bf16" and measured == []


def _kpod_row(qid: str, steps: list[str], answer: str) -> dict:
    rationale, spans = "", []
    for text in steps:
        start = len(rationale) + (1 if rationale else 0)
        rationale = f"{rationale}\n{text}" if rationale else text
        spans.append({"text": text, "start": start, "end": start + len(text)})
    return {"qid": qid, "question": "?", "rationale": rationale, "steps": spans, "answer": answer}


def test_backfill_adds_the_figures_from_a_finished_runs_predictions_once(accuracy, tmp_path):
    """A result recorded before ``arithmetic`` and ``first_missing_step`` existed gets them from
    the run's saved predictions, once; predictions of other questions are refused rather than
    mixed in."""
    import json

    test_file = tmp_path / "test.jsonl"
    rows = [
        _kpod_row("a", ["He buys 3 * 4 = 12 apples.", "Then 12 + 6 = 18."], "18"),
        _kpod_row("b", ["So 10 - 4 = 6.", "Each gets 6 / 4 = 1.5."], "1.5"),
        _kpod_row("c", ["T + 3 = 5.", "So T = 2."], "2"),
    ]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = [
        {"qid": "a", "generated": "He has 3 * 4 = 12 apples and 12 + 5 = 18. Therefore, the answer is 18."},
        {"qid": "b", "generated": "So 10 - 4 = 7 and 7 / 4 = 1.75 in all."},  # departs at the first step
        {"qid": "c", "generated": "T + 3 = 5, so the answer is 2."},
    ]
    folder = tmp_path / "train-kpod"
    folder.mkdir()
    (folder / "test_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"accuracy": 1.0, "per_question": {"a": False, "b": True, "c": True}}))
    assert accuracy.backfill(path, folder, test_file) == ["arithmetic", "first_missing_step"]
    result = json.loads(path.read_text())
    # Four equations read (c's T + 3 = 5 is not): a's 12 + 5 = 18 and b's 10 - 4 = 7 are wrong.
    assert result["arithmetic"] == {"equations": 4, "wrong": 2, "questions_with_slip": 2, "questions": 3}
    # a writes both results (12 and 18); b never writes 6; c writes 5 and 2.
    assert result["first_missing_step"] == {"a": None, "b": 0, "c": None}
    assert result["accuracy"] == 1.0  # the rest as it was
    assert accuracy.backfill(path, folder, test_file) == []  # already there
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"per_question": {"a": True, "z": True}}))
    with pytest.raises(SystemExit, match="questions differ"):
        accuracy.backfill(other, folder, test_file)
    assert (
        accuracy.predictions_folder("cpu-multistep", "gsm-symbolic", "untrained", 0).name == "eval-untrained"
    )


def test_streams_keep_a_run_folders_runs_together_and_in_order(accuracy):
    """Runs of one dataset and seed share a run folder that `kpod run` holds while it runs, so
    ``--streams`` must never put them side by side; scotd's several-rationale data is a folder of
    its own."""
    runs = [
        ("asdiv", "std-cot", 2),
        ("asdiv", "kpod", 2),
        ("asdiv", "std-cot", 3),
        ("asdiv", "scotd", 2),
        ("asdiv", "kpod-no-weights", 2),
    ]
    assert accuracy.stream_groups("cpu-asdiv", runs) == [
        [("asdiv", "std-cot", 2), ("asdiv", "kpod", 2), ("asdiv", "kpod-no-weights", 2)],
        [("asdiv", "std-cot", 3)],
        [("asdiv", "scotd", 2)],
    ]


def test_run_streams_runs_groups_side_by_side_and_each_group_in_turn(accuracy):
    """Two streams: the first runs of two groups run at the same time (each waits to see the other
    start), a group's runs never overlap and keep their order, and a failed run does not stop its
    stream."""
    import threading
    import time

    started = {run: threading.Event() for run in ("a1", "a2", "b1", "c1")}
    spans: dict[str, tuple[float, float]] = {}
    partner = {"a1": "b1", "b1": "a1"}

    def launch(run):
        begin = time.monotonic()
        started[run].set()
        if run in partner and not started[partner[run]].wait(timeout=10):
            raise AssertionError(f"{run} ran alone")
        time.sleep(0.05)
        spans[run] = (begin, time.monotonic())
        return 3 if run == "a1" else 0

    finished = accuracy.run_streams([["a1", "a2"], ["b1"], ["c1"]], 2, launch)
    assert sorted(finished) == [("a1", 3), ("a2", 0), ("b1", 0), ("c1", 0)]
    assert spans["a1"][1] <= spans["a2"][0]  # a2 after a1, although a1 failed
    assert spans["a1"][0] < spans["b1"][1] and spans["b1"][0] < spans["a1"][1]  # side by side
    # One stream: strictly one run after another, in order.
    order: list[str] = []
    assert accuracy.run_streams([["x", "y"], ["z"]], 1, lambda r: order.append(r) or 0) == [
        ("x", 0),
        ("y", 0),
        ("z", 0),
    ]
    assert order == ["x", "y", "z"]


def test_stream_threads_never_leave_cores_idle_for_streams_with_nothing_to_run(accuracy):
    """Two streams on two cores share them, one thread each; a last group alone gets both cores;
    more streams than cores still give each child a thread; nothing missing starts one stream."""
    assert accuracy.stream_threads(2, 2, 3) == (2, 1)
    assert accuracy.stream_threads(2, 2, 1) == (1, 2)
    assert accuracy.stream_threads(16, 4, 2) == (2, 8)
    assert accuracy.stream_threads(2, 3, 5) == (3, 1)
    assert accuracy.stream_threads(4, 2, 0) == (1, 4)


def test_a_stream_child_is_the_one_run_command_with_its_threads(accuracy, monkeypatch, tmp_path):
    import subprocess

    calls = []

    def fake_run(command, env, stdout, stderr):
        calls.append((command, env["OMP_NUM_THREADS"]))
        stdout.write("child output\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    launch = accuracy.launch_child("cpu-multistep", ["train.lr=1e-4"], "lr", 1, redo=True, logs=tmp_path)
    assert launch(("gsm-symbolic", "kpod", 3)) == 0
    ((command, threads),) = calls
    assert threads == "1"
    assert command[2:] == [
        "--suite", "cpu-multistep", "--dataset", "gsm-symbolic", "--method", "kpod", "--seed", "3",
        "--set=train.lr=1e-4", "--tag=lr", "--redo",
    ]  # fmt: skip
    assert (tmp_path / "cpu-multistep-gsm-symbolic-kpod+lr-s3.log").read_text() == "child output\n"
