"""`kpod run`: stages, skipping, re-running downstream only, resume after a kill, config errors, report."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kpod.cli import main
from kpod.config import from_dict
from kpod.errors import ConfigError
from kpod.pipeline import PipelineConfig, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, model: Path, **extra) -> Path:
    data = {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "methods": ["std-cot", "kpod"],
        "jobs": 1,  # one process: some tests patch functions the steps call (jobs: 2 has its own tests)
        "data": {"source": "gsm-symbolic", "n_train": 16, "n_dev": 4, "n_test": 8, "templates": [26, 43]},
        "student": {"name": str(model), "finetune": "full"},
        "weighting": {"max_steps": 2, "batch_size": 4, "precision": "fp32"},
        "schedule": {"stages": 2, "n_clusters": 2},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "precision": "fp32",
            "eval_max_new_tokens": 24,
            "test_last_epoch": True,
        },
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stages_run(run_dir: Path) -> dict[str, bool]:
    """Stage -> whether it ran (True) or was skipped (False) in the last `kpod run`."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {name: not s["skipped"] for name, s in manifest["stages"].items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tiny_models import build_causal

    tmp = tmp_path_factory.mktemp("pipeline")
    model = build_causal(tmp / "model", hidden=32, layers=2)
    config = tiny_config(tmp, model)
    assert main(["run", str(config)]) == 0
    return tmp, config


def test_run_writes_every_stage_and_a_manifest(finished_run):
    tmp, _ = finished_run
    run = tmp / "run"
    for part in ("train", "dev", "test"):
        assert (run / "data" / f"{part}.jsonl").stat().st_size > 0
    assert (run / "weights" / "weights.jsonl").exists()
    assert json.loads((run / "schedule" / "schedule.json").read_text())["keys"]
    for method in ("std-cot", "kpod"):
        trained = json.loads((run / f"train-{method}" / "training.json").read_text())
        assert trained["method"] == method and trained["test"]["n"] == 8
        # A random tiny student answers nothing on dev: equal dev scores keep the later epoch, the
        # last (and for kpod, with T = 2 in 2 epochs, the only one that trained whole rationales).
        assert trained["best_epoch"] == 1 and trained["test_last"]["n"] == 8
        assert [d["epoch"] for d in trained["dev"]] == ([1] if method == "kpod" else [0, 1])
        assert (run / f"train-{method}" / "student" / "config.json").exists()
        assert not (run / f"train-{method}" / "checkpoints").exists()  # cleaned once the student is saved
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config_hash"] and manifest["versions"]["torch"] and "git_commit" in manifest
    assert all(s["seconds"] is not None for s in manifest["stages"].values())
    assert "test % (last stage)" in (run / "report.html").read_text(encoding="utf-8")


def test_rerun_skips_and_a_changed_setting_reruns_only_downstream(finished_run, capsys):
    tmp, config = finished_run
    run = tmp / "run"
    assert main(["run", str(config)]) == 0
    assert not any(stages_run(run).values())  # nothing to do
    printed = capsys.readouterr().out
    assert "kpod - std-cot:" in printed and "McNemar p =" in printed  # the paired line after the accuracies
    assert main(["run", str(config), "schedule.beta=3.0"]) == 0
    ran = stages_run(run)
    assert ran == {
        "data": False,
        "weights": False,
        "schedule": True,
        "eval-untrained": False,
        "train-std-cot": False,
        "train-kpod": True,
    }
    assert main(["run", str(config), "schedule.beta=3.0", "train.lr=0.002"]) == 0
    ran = stages_run(run)
    assert ran["train-std-cot"] and ran["train-kpod"] and not ran["schedule"] and not ran["weights"]


def test_weight_rescaling_reaches_difficulty_and_the_loss(finished_run, monkeypatch):
    import kpod.weighting.weights as weighting_weights

    tmp, config = finished_run
    calls = []
    real = weighting_weights.load_weights

    def recording(path, rescale="none", floor=0.1):
        calls.append((rescale, floor))
        return real(path, rescale, floor)

    assert main(["run", str(config)]) == 0  # the defaults, whatever an earlier test left
    monkeypatch.setattr(weighting_weights, "load_weights", recording)
    before = (tmp / "run" / "schedule" / "difficulty.jsonl").read_text()
    assert main(["run", str(config), "weighting.rescale=minmax", "weighting.rescale_floor=0.0"]) == 0
    ran = stages_run(tmp / "run")
    # The trained weights do not depend on how they are read: only their readers re-run.
    assert ran["schedule"] and ran["train-kpod"] and not ran["weights"] and not ran["train-std-cot"]
    # The schedule's difficulty scoring and kpod's loss read the rescaled weights ...
    assert calls == [("minmax", 0.0), ("minmax", 0.0)]
    # ... and the difficulties move (softmax over [0, 1]-spread weights, not over near-equal ones).
    assert (tmp / "run" / "schedule" / "difficulty.jsonl").read_text() != before


def _logged(run: Path, method: str, field: str) -> list[Any]:
    """``field`` of every row of a training's train_log.jsonl."""
    log = (run / f"train-{method}" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)[field] for line in log]


def _sigkill_at(proc: subprocess.Popen, path: Path, seconds: float = 180) -> bool:
    """SIGKILL ``proc`` once ``path`` exists (or after ``seconds``); whether it existed."""
    deadline = time.time() + seconds
    while time.time() < deadline and not path.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return path.exists()


def _ends(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline and _running(pid):
        time.sleep(0.1)
    return not _running(pid)


def test_jobs_2_runs_the_steps_that_read_only_the_data_in_a_second_process(finished_run, tmp_path, capsys):
    import torch

    tmp, config = finished_run
    assert main(["run", str(config)]) == 0  # the defaults, whatever an earlier test left
    side_run = tmp_path / "side-run"
    capsys.readouterr()
    assert main(["run", str(config), "jobs=2", f"run_dir={side_run}"]) == 0
    printed = capsys.readouterr().out
    assert "[eval-untrained, train-std-cot] side by side in process" in printed
    assert "[train-std-cot] done in" in printed and "(side process)" in printed
    ran = stages_run(side_run)
    assert set(ran) == {"data", "weights", "schedule", "eval-untrained", "train-std-cot", "train-kpod"}
    assert all(ran.values())
    steps = json.loads((side_run / "manifest.json").read_text())["stages"]
    shared = max(1, torch.get_num_threads() // 2)
    # Half the threads each, for every step, whichever process ends first: a step's numbers must not
    # depend on when the other process ended (kpod.streams).
    for name in ("eval-untrained", "train-std-cot"):
        assert steps[name]["process"] != os.getpid()
        assert steps[name]["threads"] == shared
    for name in ("weights", "schedule", "train-kpod"):
        assert steps[name]["process"] == os.getpid()
        assert steps[name]["threads"] == shared
    assert "[train-std-cot] done in" in (side_run / "side.log").read_text()
    note = f"ran in the side process, {steps['train-std-cot']['threads']} thread(s)"
    assert note in (side_run / "report.html").read_text()
    # The same steps as one process ran them (fp32 here: only the order of sums differs).
    for method in ("std-cot", "kpod"):
        losses = _logged(side_run, method, "loss")
        assert losses == pytest.approx(_logged(tmp / "run", method, "loss"), rel=1e-3)
    one = json.loads((tmp / "run" / "eval-untrained" / "stage.json").read_text())["result"]["test"]
    two = steps["eval-untrained"]["result"]["test"]
    assert (one["n"], one["correct"]) == (two["n"], two["correct"])
    # Finished: a second run starts no second process.
    assert main(["run", str(config), "jobs=2", f"run_dir={side_run}"]) == 0
    assert "side by side" not in capsys.readouterr().out and not any(stages_run(side_run).values())


def test_a_failed_side_process_ends_the_run_after_the_main_stream(
    finished_run, tmp_path, monkeypatch, capsys
):
    import kpod.streams

    tmp, config = finished_run
    side_run = tmp_path / "side-run"
    real = kpod.streams.SideProcess._job
    # A side process whose job names another parent refuses to work under the run's lock.
    monkeypatch.setattr(kpod.streams.SideProcess, "_job", lambda self, *a: {**real(self, *a), "parent": 1})
    assert main(["run", str(config), "jobs=2", f"run_dir={side_run}", "methods=[std-cot,kpod]"]) == 2
    err = capsys.readouterr().err
    assert "the side process running eval-untrained, train-std-cot failed (exit code 2)" in err
    assert "runs only under its parent's lock" in err and str(side_run / "side.log") in err
    for name in ("weights", "schedule", "train-kpod"):  # the main stream finished
        assert json.loads((side_run / name / "stage.json").read_text())["done"]
    assert not (side_run / "train-std-cot").exists()
    monkeypatch.undo()
    assert main(["run", str(config), "jobs=2", f"run_dir={side_run}"]) == 0  # resumes with the side steps
    ran = stages_run(side_run)
    assert ran["train-std-cot"] and ran["eval-untrained"] and not ran["train-kpod"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_side_process_ends_with_a_killed_main_process_and_the_run_resumes(tmp_path):
    from tiny_models import build_causal

    model = build_causal(tmp_path / "model", hidden=32, layers=2)
    config = tiny_config(
        tmp_path,
        model,
        methods=["std-cot", "kpod"],
        eval_untrained=False,
        jobs=2,
        train={
            "epochs": 6,
            "save_every": 1,
            "keep_checkpoints": 50,  # step 3's stays until the kill, however late the poll sees it
            "batch_size": 2,
            "micro_batch_size": 2,
            "select": "last",
        },
    )
    cmd = [sys.executable, "-m", "kpod.cli", "run", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    side = None
    for line in proc.stdout:  # "[train-std-cot] side by side in process PID, ..."
        match = re.search(r"side by side in process (\d+)", line)
        if match:
            side = int(match.group(1))
            break
    assert side is not None, "no side process was started"
    ckpts = tmp_path / "run" / "train-std-cot" / "checkpoints"
    assert _sigkill_at(proc, ckpts / "step-00000003"), "the side process never trained"
    assert _ends(side, 15), "the side process outlived its killed parent"
    marker = json.loads((tmp_path / "run" / "train-std-cot" / "stage.json").read_text())
    assert not marker["done"], "the side process went on training after its parent was killed"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # Resumed in a side process again, or in the main one where the first run had finished the main
    # stream before the kill (kpod trains as fast as std-cot here; then there is nothing to put beside).
    assert re.search(r"\[train-std-cot\] resuming( \(side process\))?\n", out.stdout), out.stdout
    assert _logged(tmp_path / "run", "std-cot", "step") == list(range(1, 49))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_silent_side_process_ends_within_seconds_of_its_killed_parent(tmp_path):
    """A side process that writes nothing (a long generation) does not learn of its parent's death
    from a broken pipe (nor does one whose only output is tqdm's, which ignores a broken pipe): it ends
    with its parent (kpod.streams._end_with_parent)."""
    child = (
        "import os, time\n"
        "from kpod.streams import _end_with_parent\n"
        "_end_with_parent(os.getppid())\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    side = int(proc.stdout.readline())
    time.sleep(3)  # the child has imported kpod and watches
    assert _running(side)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _ends(side, 3), "the silent side process outlived its killed parent"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_process_shares_the_threads_until_its_side_by_side_part_is_over():
    import torch

    from kpod.streams import share_threads, stop_sharing

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        share_threads(1)
        assert torch.get_num_threads() == 1
        share_threads(1)  # twice: still gives back the count from before the first
        stop_sharing()
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)
        stop_sharing()  # no longer sharing: nothing to give back
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_jobs_auto_is_one_process_where_a_second_would_not_help(monkeypatch):
    import torch

    from kpod.errors import KpodError
    from kpod.streams import resolve_jobs

    before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        torch.set_num_threads(2)
        assert resolve_jobs("auto") == 2 and resolve_jobs(1) == 1
        torch.set_num_threads(1)  # an accuracy suite's one-thread stream
        assert resolve_jobs("auto") == 1 and resolve_jobs(2) == 2
        torch.set_num_threads(2)
        monkeypatch.setenv("WORLD_SIZE", "2")  # every rank would start a side process
        assert resolve_jobs("auto") == 1
        with pytest.raises(KpodError, match="set jobs=1"):
            resolve_jobs(2)
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU for two processes
        assert resolve_jobs("auto") == 1
    finally:
        torch.set_num_threads(before)


def test_side_steps_are_those_that_read_only_the_data():
    from kpod.pipeline import pipeline_config, plan_steps
    from kpod.streams import side_step_names

    def side(**data):
        return side_step_names(plan_steps(pipeline_config(data), Path("run")))

    assert side(methods=["std-cot", "kpod"]) == ["eval-untrained", "train-std-cot"]
    assert side(methods=["kpod", "kpod-no-weights"]) == ["eval-untrained"]
    assert side(methods=["kpod"], eval_untrained=False) == []
    assert side(methods=["answer-only", "kpod-no-progressive", "std-cot"]) == [
        "eval-untrained",
        "train-answer-only",
        "train-std-cot",
    ]
    # With teacher rationales the side waits for the teacher step, not for the data alone.
    teacher = {"source": "server", "base_url": "http://localhost:1", "model": "m"}
    assert side(methods=["std-cot", "kpod"], teacher=teacher) == ["eval-untrained", "train-std-cot"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("jobs=3", "jobs must be 1, 2 or auto, got 3"),
        ("train.lrr=1", "unknown key 'train.lrr'; known keys in train: .*lr"),
        ("train.epochs=two", "train.epochs: expected an integer"),
        ("train.precision=fp8", "precision: 'fp8' is not allowed; choose one of: auto, fp32, bf16, fp16"),
        ("methods=[kpod,foo]", "methods: 'foo' is not allowed"),
        ("data.source=file", "data.source 'file' needs data.path"),
        ("colour=red", "unknown key 'colour'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key_with_exit_code_2(finished_run, capsys, override, message):
    _, config = finished_run
    assert main(["run", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert str(config) in err


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epochs: [1,\n")
    assert main(["run", str(bad)]) == 2
    assert re.search(r"bad.yaml:\d+: not valid YAML", capsys.readouterr().err)


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_pipeline_config(path)
        assert isinstance(config, PipelineConfig), path
    with pytest.raises(ConfigError, match="weighting.student must be the student"):
        from_dict(PipelineConfig, {"student": {"name": "a"}, "weighting": {"student": "b"}})


@pytest.mark.slow
def test_killed_run_resumes_instead_of_restarting(tmp_path):
    from tiny_models import build_causal

    model = build_causal(tmp_path / "model", hidden=32, layers=2)
    config = tiny_config(
        tmp_path,
        model,
        methods=["std-cot"],
        eval_untrained=False,
        train={
            "epochs": 6,
            "save_every": 1,
            "keep_checkpoints": 50,
            "batch_size": 2,
            "micro_batch_size": 2,
            "select": "last",
        },
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kpod.cli", "run", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "train-std-cot" / "checkpoints"
    assert _sigkill_at(proc, ckpts / "step-00000010"), "training never reached step 10"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[data] up to date, skipped" in out.stdout
    assert "[train-std-cot] resuming" in out.stdout
    assert re.search(r"resuming from .*step-000000\d\d \(step \d+ of 48\)", out.stderr)
    assert _logged(tmp_path / "run", "std-cot", "step") == list(range(1, 49))


def test_python_api_runs_the_same_pipeline_and_single_steps(finished_run, tmp_path):
    import dataclasses

    import kpod
    from kpod.progressive.schedule import load_schedule_inputs

    tmp, config_path = finished_run
    assert main(["run", str(config_path)]) == 0  # the defaults, whatever an earlier test left
    config = kpod.load_config(config_path)
    run = kpod.run(config, echo=lambda _: None)
    assert not any(stages_run(tmp / "run").values())  # the CLI's keys: every step up to date
    assert run.directory == tmp / "run" and run.report.is_file()
    trained = json.loads((tmp / "run" / "train-kpod" / "training.json").read_text())
    assert run.results["kpod"]["accuracy"] == trained["test"]["accuracy"]
    assert set(run.results) == {"untrained", "std-cot", "kpod"}
    # One step alone, on objects: distil from the run's data, weights and schedule.
    examples, _ = kpod.load_examples(tmp / "run" / "data" / "train.jsonl")
    weights = kpod.load_weights(tmp / "run" / "weights")
    assert all(isinstance(w, kpod.TokenWeights) for w in weights.values())
    result = kpod.distill_student(
        dataclasses.replace(config.train, method="kpod", epochs=2, select="last"),
        config.student,
        examples,
        tmp_path / "api-kpod",
        weights=weights,
        inputs=load_schedule_inputs(tmp / "run" / "schedule"),
        progress=False,
    )
    assert result.method == "kpod" and result.steps == 8 and (tmp_path / "api-kpod" / "student").is_dir()
    assert kpod.evaluate_model.__module__ == "kpod.evaluate"
    with pytest.raises(AttributeError):
        kpod.no_such_function  # noqa: B018


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    from tiny_models import build_causal

    model = build_causal(tmp_path / "model", hidden=32, layers=2)
    config = tiny_config(tmp_path, model, methods=["std-cot"], eval_untrained=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kpod.cli", "run", str(config)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "data").exists():
            time.sleep(0.02)
        assert first.poll() is None, "the first run finished before the second started"
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run finished before the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert f"is being written by process {first.pid}" in second.stderr
    assert str(tmp_path / "run") in second.stderr and "Traceback" not in second.stderr
    assert "-> " not in second.stdout  # refused before it printed or wrote anything
    assert set(before) <= {p.name for p in (tmp_path / "run").iterdir()}


CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const width = document.documentElement.clientWidth;
  const overflow = [...document.querySelectorAll('body *')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > width + 1 || r.left < -1);
  }).map(e => e.tagName + (e.className ? '.' + e.className : ''));
  const out = document.createElement('pre');
  out.id = 'kpod-check';
  out.textContent = 'KPOD-CHECK ' + JSON.stringify({images: imgs.length, broken: broken,
    overflow: overflow.slice(0, 5), scrollWidth: document.documentElement.scrollWidth, width: width});
  document.body.appendChild(out);
});
</script>
"""


def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    """Every image of report.html loads and nothing sticks out of a 1000 px wide window."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    run_tmp, _ = finished_run
    report = (run_tmp / "run" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in report and "http://" not in report and "https://" not in report  # self-contained
    page = tmp_path / "check.html"
    page.write_text(report.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1000,800",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"KPOD-CHECK (\{.*?\})</pre>", out.stdout)
    assert found, out.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] >= 3 and check["broken"] == 0, check
    assert check["overflow"] == [] and check["scrollWidth"] <= check["width"], check


def test_report_command_rebuilds_the_report(finished_run, capsys):
    tmp, _ = finished_run
    report = tmp / "run" / "report.html"
    report.unlink()
    assert main(["report", str(tmp / "run")]) == 0
    page = report.read_text()
    assert "untrained" in page and "std-cot" in page and "kpod" in page and page.count("<img") >= 3
    assert "<h2>Paired with std-cot</h2>" in page and "kpod - std-cot:" in page
    assert "input steps" in page and "first step is generated in" in page  # the schedule's table
    assert main(["report", str(tmp)]) == 2  # not a run directory
    assert "no manifest.json" in capsys.readouterr().err


def test_an_edited_data_file_reruns_the_data_stage(tmp_path):
    from kpod.data.synthetic import gsm_symbolic_examples
    from kpod.io import write_jsonl
    from kpod.pipeline import Runner, load_pipeline_config, run_data_step

    data = tmp_path / "train.jsonl"
    examples, _ = gsm_symbolic_examples(12, templates=(26,))
    write_jsonl(data, [e.to_dict() for e in examples])
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata: {{source: file, path: {data}, n_dev: 2, n_test: 3}}\n"
    )
    config = load_pipeline_config(config_path)
    run_data_step(Runner(config, {}, echo=lambda _: None), config)
    runner = Runner(config, {}, echo=lambda _: None)
    run_data_step(runner, config)
    assert runner.manifest["stages"]["data"]["skipped"]
    write_jsonl(data, [e.to_dict() for e in examples[:10]])  # the file changes, the config does not
    runner = Runner(config, {}, echo=lambda _: None)
    assert run_data_step(runner, config)["train"] == 5  # 10 - 2 dev - 3 test
    assert not runner.manifest["stages"]["data"]["skipped"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_untrained_evaluation_generates_in_the_trained_students_precision(tmp_path, precision) -> None:
    from tiny_models import build_causal

    from kpod.pipeline import data_step, eval_untrained_step

    model = build_causal(tmp_path / "model", hidden=32, layers=2)
    config = load_pipeline_config(tiny_config(tmp_path, model, train={"eval_precision": precision}))
    data_step(config.data, tmp_path / "data")
    result = eval_untrained_step(config, tmp_path / "data" / "test.jsonl", tmp_path / "eval")
    assert result["test"]["precision"] == precision and result["test"]["n"] == 8
