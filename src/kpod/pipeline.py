"""``kpod run CONFIG.yaml``: the whole pipeline from one config, resumable step by step.

Steps, in order (each in its own folder of the run directory; one function each, ``<name>_step``,
shared with the subcommands)::

    data            train / dev / test JSONL (+ statistics)
    teacher         teacher rationales from an OpenAI-compatible server (only with teacher.source=server)
    weights         token weighting by mask learning (Eqs. 2-7) -> weights.jsonl, keypoint heat-maps
    schedule*       step difficulty (Eq. 8), clusters, the planned schedule (Eqs. 9-12) per variant
    eval-untrained  the student before distillation, on the test split
    train-<method>  one distillation run per method (kpod, std-cot, ablations...), same budget
    report          report.html (self-contained) and the PNG plots

Each step has a key: the hash of the settings it reads and of the keys of the steps it reads
from. A step whose folder holds a finished marker with the same key is skipped; a changed
setting changes the key of that step and of everything downstream, and nothing upstream. A step
interrupted half-way keeps its folder when its key is unchanged, so training resumes from its last
checkpoint and scoring from its cache. ``manifest.json`` records the config and its hash, the
inputs, package versions, git commit and every step's timing.

Words: a pipeline *step* is one of the above; a *stage* is the schedule's (t = 0..T, one per
training epoch). The file names keep their history: each step's marker is ``stage.json`` and the
manifest lists steps under ``"stages"``, so run directories of earlier versions still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kpod.config import apply_overrides, from_dict, key_data, read_yaml
from kpod.data.schema import Example
from kpod.distill.methods import METHODS, get_method
from kpod.distill.trainer import TrainConfig, TrainResult, test_summary
from kpod.errors import ConfigError, DataError, KpodError
from kpod.io import write_json, write_jsonl
from kpod.lock import holds_lock
from kpod.models import StudentConfig
from kpod.progressive.schedule import DifficultyConfig, ScheduleConfig, StageInputs, load_schedule_inputs
from kpod.streams import (
    SIDE_LOG,
    Jobs,
    SideProcess,
    resolve_jobs,
    share_threads,
    side_step_names,
    stop_sharing,
)
from kpod.teacher.config import TeacherConfig
from kpod.weighting.train import WeightingConfig
from kpod.weighting.weights import TokenWeights


@dataclass(frozen=True)
class DataConfig:
    """Where the questions and rationales come from, and how they are split.

    Attributes:
        source: ``gsm-symbolic`` (offline GSM8K-style problems from reasoning-gym, their
            solutions as rationales), ``file`` (``path``, any format kpod reads) or ``gsm8k-hub``
            (``openai/gsm8k`` from the Hugging Face hub).
        path: the training file (``source: file``).
        format: its format (default: detected).
        test_path: a separate test file; without it the test questions are held out of the
            training data (gsm-symbolic: generated with another seed).
        paper_split: with a GSM8K test file: ``paper_split.json`` beside it cuts the test set into
            the paper's dev (660) and test (659) questions; the test part is used.
        n_train: training questions kept (``null``: all), the first ones in file order after the
            dev questions are held out, each with all its kept rationales (one rationale per
            question: the same as counting rationales).
        n_dev: questions held out of training for model selection (0: none).
        n_test: test questions scored (``null``: all).
        rationales_per_question: keep at most this many rationales of each training question
            (``null``: all), drawn by ``seed`` among its correct ones
            (:func:`kpod.data.splits.choose_rationales`).
        templates: gsm-symbolic only: generator ids to draw problems from (empty: all).
        seed: seeds generation and the splits.
        skip_invalid: skip unreadable records (counted) instead of stopping at the first.
    """

    source: Literal["gsm-symbolic", "file", "gsm8k-hub"] = "gsm-symbolic"
    path: str | None = None
    format: str | None = None
    test_path: str | None = None
    paper_split: bool = False
    n_train: int | None = 240
    n_dev: int = 32
    n_test: int | None = 100
    rationales_per_question: int | None = None
    templates: tuple[int, ...] = ()
    seed: int = 0
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if self.source == "file" and not self.path:
            raise ConfigError("path: data.source 'file' needs data.path (a training file)")
        if self.rationales_per_question is not None and self.rationales_per_question < 1:
            raise ConfigError(
                f"rationales_per_question must be at least 1, got {self.rationales_per_question}"
            )
        if self.n_dev < 0 or (self.n_train is not None and self.n_train < 1):
            raise ConfigError(f"n_train must be >= 1 and n_dev >= 0, got {self.n_train} and {self.n_dev}")


@dataclass(frozen=True)
class ReportConfig:
    """What the HTML report shows.

    Attributes:
        heatmaps: sample rationales shown with their token weights.
        predictions: example predictions shown per outcome (right and wrong).
    """

    heatmaps: int = 6
    predictions: int = 4


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``kpod run`` does, section by section (see ``configs/quickstart.yaml``).

    Attributes:
        name: the run's name; the run directory defaults to ``runs/<name>``.
        run_dir: where every artifact goes.
        methods: the methods trained and compared, same budget (``train`` settings) for each.
        eval_untrained: also score the student before distillation.
        jobs: processes the steps run in: ``1`` one after another; ``2`` the steps that read only
            the data (``eval-untrained``, std-cot and the other methods without token weights or a
            schedule) in a second process beside the others, each process with half the threads;
            ``auto`` (default) 2 on a CPU with two threads or more outside a distributed launch,
            else 1 (:mod:`kpod.streams`; two one-thread processes trained at 1.38-1.53x one
            two-thread process's rate on a 2-core machine; twice the memory).
    """

    name: str = "kpod"
    run_dir: str | None = None
    methods: tuple[str, ...] = ("std-cot", "kpod")
    eval_untrained: bool = True
    jobs: Jobs = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if self.jobs not in (1, 2, "auto"):
            raise ConfigError(f"jobs must be 1, 2 or auto, got {self.jobs!r}")
        if not self.methods:
            raise ConfigError("methods: name at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: '{m}' is not allowed; choose from: {', '.join(METHODS)}")
        progressive = [m for m in self.methods if METHODS[m].progressive]
        if progressive and self.schedule.stages is not None and self.schedule.stages > self.train.epochs:
            raise ConfigError(
                f"schedule.stages (T = {self.schedule.stages}) is larger than train.epochs "
                f"({self.train.epochs}): {progressive[0]} would never train on a whole rationale; "
                "set schedule.stages <= train.epochs (the paper: epochs / 2) or leave it out"
            )
        if self.weighting.student != self.student.name:
            raise ConfigError(
                "weighting.student must be the student (the weights are aligned to its tokens): "
                f"'{self.weighting.student}' != '{self.student.name}'; leave weighting.student out"
            )

    @property
    def directory(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def pipeline_config(data: dict[str, Any]) -> PipelineConfig:
    """A validated config from its nested dict; weighting.student follows student.name unless
    given (the weights are aligned to the student's tokens). ``data`` is not modified."""
    data = dict(data)
    student = data.get("student", {}) if isinstance(data.get("student"), dict) else {}
    weighting = data.get("weighting", {})
    if isinstance(weighting, dict) and "student" not in weighting:
        data["weighting"] = {**weighting, "student": student.get("name", StudentConfig().name)}
    schedule = data.get("schedule", {})
    train = data.get("train", {}) if isinstance(data.get("train"), dict) else {}
    if isinstance(schedule, dict) and schedule.get("stages") is None:
        epochs = train.get("epochs", TrainConfig.epochs)
        if isinstance(epochs, int) and epochs >= 1:
            data["schedule"] = {**schedule, "stages": max(1, epochs // 2)}  # the paper's T = epochs / 2
    return from_dict(PipelineConfig, data)


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """The config file plus ``key=value`` overrides (see :func:`pipeline_config`)."""
    data = apply_overrides(read_yaml(path), list(overrides))
    try:
        return pipeline_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_files(cfg: DataConfig) -> dict[str, str]:
    """sha256 of every data file the data step reads, so that an edited file re-runs it."""
    out = {}
    for path in (cfg.path, cfg.test_path):
        if path and Path(path).is_file():
            out[str(path)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from kpod.allocator import current_allocator

    out = {"python": platform.python_version()}
    for pkg in ("kpod", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    out["malloc"] = current_allocator()  # CPU speed depends on it (kpod.allocator), results do not
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Runner:
    """Runs pipeline steps with keys, skipping finished ones; keeps the manifest."""

    def __init__(
        self,
        config: PipelineConfig,
        config_data: dict[str, Any],
        echo: Callable[[str], None] = print,
        manifest: bool = True,
    ):
        """``manifest=False``: never write ``manifest.json`` (a run's side process, whose steps the
        main process records: :mod:`kpod.streams`)."""
        self.config = config
        self.writes_manifest = manifest
        self.dir = config.directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        manifest_path = self.dir / "manifest.json"
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        self.manifest: dict[str, Any] = {
            "config": config_data,
            "config_hash": _hash(config_data),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": old.get("stages", {}),
        }
        self.keys: dict[str, str] = {}

    def key(self, name: str, settings: Any, upstream: list[str]) -> str:
        """Step ``name``'s key (its settings and its upstream steps' keys), remembered for the steps
        downstream of it."""
        key = _hash({"settings": key_data(settings), "upstream": [self.keys[u] for u in upstream]})
        self.keys[name] = key
        return key

    def _state(self, name: str) -> dict[str, Any] | None:
        """Step ``name``'s marker (``stage.json``), or None before it first ran."""
        marker = self.dir / name / "stage.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def finished(self, name: str) -> dict[str, Any] | None:
        """Step ``name``'s marker if it finished with its present key (:meth:`key` first), else None."""
        state = self._state(name)
        return state if _done(state, self.keys[name]) else None

    def step(
        self, name: str, settings: Any, upstream: list[str], fn: Callable[[Path], dict[str, Any]]
    ) -> dict:
        """Run step ``name`` unless finished with the same key; returns its result."""
        key = self.key(name, settings, upstream)
        folder = self.dir / name
        marker = folder / "stage.json"
        state = self._state(name)
        if _done(state, key):
            self.echo(f"[{name}] up to date, skipped")
            self.manifest["stages"][name] = {**state, "skipped": True}
            return state["result"]
        if state and state.get("key") != key or (folder.exists() and state is None):
            shutil.rmtree(folder)  # settings changed: start this step afresh
        resumed = bool(state) and state.get("key") == key
        folder.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"key": key, "done": False})
        self.echo(f"[{name}] {'resuming' if resumed else 'running'}")
        start, threads = time.perf_counter(), _threads()
        result = fn(folder)
        seconds = round(time.perf_counter() - start, 1)
        entry = {
            "key": key,
            "done": True,
            "seconds": seconds,
            "upstream": upstream,
            "result": result,
            "process": os.getpid(),
            "threads": threads,  # half the machine's in a side-by-side run (kpod.streams)
        }
        write_json(marker, entry)
        self.manifest["stages"][name] = {**entry, "skipped": False}
        self.save_manifest()
        self.echo(f"[{name}] done in {seconds:.0f} s")
        return result

    def record(self, name: str) -> dict[str, Any]:
        """Put step ``name``, finished by the side process, into the manifest; returns its result."""
        state = self.finished(name)
        if state is None:
            raise KpodError(f"step {name} did not finish in the side process (see {self.dir / SIDE_LOG})")
        self.manifest["stages"][name] = {**state, "skipped": False, "side": True}
        self.save_manifest()
        return state["result"]

    def save_manifest(self) -> None:
        if self.writes_manifest:
            write_json(self.dir / "manifest.json", self.manifest)


def _done(state: dict[str, Any] | None, key: str) -> bool:
    """Whether a step's marker says it finished with ``key``."""
    return bool(state) and state.get("key") == key and bool(state.get("done"))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device() -> str | None:
    """Scoring and evaluation outside the trainer use the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _read_examples(path: Path):
    from kpod.data.loaders import load_examples

    return load_examples(path, "kpod")[0]


def _read_weights(folder: Path, wcfg: WeightingConfig):
    from kpod.weighting.weights import load_weights

    return load_weights(folder, wcfg.rescale, wcfg.rescale_floor)


def _write_examples(path: Path, examples) -> None:
    write_jsonl(path, [e.to_dict() for e in examples])


def data_step(cfg: DataConfig, folder: Path) -> dict[str, Any]:
    """train/dev/test splits by question, written as kpod JSONL."""
    from kpod.data.loaders import load_examples, load_gsm8k_hub
    from kpod.data.splits import carve_dev, choose_rationales, gsm8k_paper_split, split_by_question
    from kpod.data.stats import compute_stats
    from kpod.data.synthetic import gsm_symbolic_examples

    test = None
    if cfg.source == "gsm-symbolic":
        n = (cfg.n_train or 1000) + cfg.n_dev
        examples, report = gsm_symbolic_examples(n, seed=cfg.seed, templates=cfg.templates)
        if cfg.test_path is None:
            # A different seed gives different numbers; drop any question also in training.
            seen = {e.question for e in examples}
            more, _ = gsm_symbolic_examples(
                2 * (cfg.n_test or 100), seed=cfg.seed + 10_000, templates=cfg.templates
            )
            test = [e for e in more if e.question not in seen]
    elif cfg.source == "gsm8k-hub":
        examples, report = load_gsm8k_hub("train"), None
        if cfg.test_path is None:
            test = load_gsm8k_hub("test")
            if cfg.paper_split:
                test = gsm8k_paper_split(test, "test")
    else:
        examples, report = load_examples(cfg.path, cfg.format, skip_invalid=cfg.skip_invalid)
    if cfg.test_path is not None:
        test, _ = load_examples(cfg.test_path, None, skip_invalid=cfg.skip_invalid)
        if cfg.paper_split:
            test = gsm8k_paper_split(test, "test")
    if test is None:  # hold test questions out of the training file
        parts = split_by_question(examples, {"test": cfg.n_test or 0.2, "rest": -1}, seed=cfg.seed + 1)
        test, examples = parts["test"], parts["rest"]
    examples = [e for e in examples if e.steps]
    examples = choose_rationales(examples, cfg.rationales_per_question, seed=cfg.seed)
    if not examples:
        raise DataError("the training data has no rationales")
    train, dev = carve_dev(examples, cfg.n_dev, seed=cfg.seed) if cfg.n_dev else (examples, [])
    if cfg.n_train is not None:  # the first n_train questions, each with all its kept rationales
        first = dict.fromkeys(e.qid for e in train)
        kept_questions = set(list(first)[: cfg.n_train])
        train = [e for e in train if e.qid in kept_questions]
    test = list({e.qid: e for e in test}.values())
    if cfg.n_test is not None:
        test = test[: cfg.n_test]
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        _write_examples(folder / f"{name}.jsonl", part)
    from kpod.data.loaders import LoadReport

    stats = compute_stats(train, report or LoadReport(source="hub"))
    write_json(folder / "stats.json", stats)
    return {"train": len(train), "dev": len({e.qid for e in dev}), "test": len(test), "stats": stats}


def teacher_step(cfg: TeacherConfig, train_path: Path, folder: Path) -> dict[str, Any]:
    """Teacher rationales for the training questions, filtered by their answers."""
    import asyncio

    from kpod.teacher.client import ChatClient, api_key_from_env
    from kpod.teacher.generate import (
        GenerationSettings,
        TeacherPrompt,
        filter_rationales,
        generate_rationales,
    )
    from kpod.teacher.store import RationaleStore

    questions = _read_examples(train_path)
    settings = GenerationSettings(cfg.n_samples, cfg.temperature, cfg.max_tokens, cfg.concurrency)
    prompt = TeacherPrompt()
    client = ChatClient(cfg.base_url, cfg.model, api_key=api_key_from_env(cfg.api_key_env))

    async def run():
        try:
            with RationaleStore(folder / "store.jsonl") as store:
                summary = await generate_rationales(
                    questions, client, store, settings, prompt, server=cfg.base_url
                )
                return summary, list(store)
        finally:
            await client.aclose()

    summary, records = asyncio.run(run())
    if summary.incomplete:  # the step is not cached as done; the store keeps what was generated
        raise KpodError(
            f"teacher: {summary.incomplete} of {summary.wanted} samples are not generated "
            f"({summary.failed} failed after retries, {summary.left_undone} left undone); "
            "run again to resume (what was generated is kept)"
        )
    kept, report = filter_rationales(records, teacher=cfg.model, prompt_hash=prompt.hash)
    _write_examples(folder / "train.jsonl", kept)
    return {"generated": summary.generated, "kept": len(kept), "filter": report.line()}


def weights_step(cfg: WeightingConfig, train_path: Path, folder: Path, n_heatmaps: int) -> dict[str, Any]:
    from kpod.weighting.evaluate import keypoint_metrics, token_class_metrics, weight_range
    from kpod.weighting.train import train_weighting
    from kpod.weighting.visualise import html_heatmap
    from kpod.weighting.weights import load_weights

    examples = _read_examples(train_path)
    _, history = train_weighting(examples, cfg, folder)
    rows = load_weights(folder)
    metrics: dict[str, Any] = {
        "steps": len(history),
        "kept_ratio": history[-1]["kept_ratio"] if history else None,
    }
    if any(e.keypoints for e in examples):
        metrics.update(keypoint_metrics(examples, rows))
    else:
        metrics.update(token_class_metrics(examples, rows))
    metrics["w_min"], metrics["w_max"] = (round(v, 4) for v in weight_range(rows))
    shown = examples[:n_heatmaps]
    (folder / "heatmaps.html").write_text(html_heatmap(shown, rows), encoding="utf-8")
    return metrics


def schedule_step(
    cfg: ScheduleConfig,
    dcfg: DifficultyConfig,
    student: str,
    examples: Sequence[Example],
    weights: Mapping[str, TokenWeights] | None,
    folder: Path,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Difficulty scores (cached in ``folder``, so an interrupted scoring resumes), clusters and the
    planned schedule of ``examples``: ``schedule.json`` and ``schedule.png`` in ``folder``.

    ``student`` is the pretrained student that scores difficulty; ``weights`` the token weights by
    rationale key, already rescaled as the run reads them (``None``: uniform, Eq. 8 without
    weights); ``seed`` seeds K-means (`kpod run` uses 0, `kpod schedule plan` its ``--seed``).
    Shared by `kpod run` and `kpod schedule plan`."""
    from kpod.models import load_model
    from kpod.progressive.difficulty import cluster_questions, question_embeddings, score_difficulties
    from kpod.progressive.schedule import plan_schedule
    from kpod.report import plot_schedule
    from kpod.weighting.weights import rationale_key

    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model(student, trainable=False, device=_device())
    diffs = score_difficulties(
        examples,
        loaded,
        weights,
        batch_size=dcfg.batch_size,
        cache=folder / "difficulty.jsonl",
        precision=dcfg.precision,
    )
    emb = question_embeddings([e.question for e in examples], loaded, dcfg.cluster_encoder)
    clusters = cluster_questions(emb, cfg.n_clusters, seed=seed)
    schedule = plan_schedule([diffs[rationale_key(e)] for e in examples], clusters.tolist(), cfg)
    plan = schedule.to_dict()
    plan["keys"] = [rationale_key(e) for e in examples]
    plan["qids"] = [e.qid for e in examples]
    write_json(folder / "schedule.json", plan)
    plot_schedule(schedule, folder / "schedule.png")
    return {
        "stages": cfg.stages,
        "advanced": schedule.advanced,
        "total_difficulty": schedule.total_difficulty,
    }


def eval_untrained_step(config: PipelineConfig, test_path: Path, folder: Path) -> dict[str, Any]:
    """The student before distillation on the test split, generated in the precision and batch the
    trained students' test scoring uses (``train.eval_precision``, ``train.eval_batch_size``), so
    the three figures of a run are scored alike (before session 26 it generated in fp32 always)."""
    from kpod.evaluate import evaluate
    from kpod.models import load_model
    from kpod.prompt import PromptFormat

    loaded = load_model(config.student.name, trainable=False, device=_device())
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        _read_examples(test_path),
        kind=loaded.kind,
        fmt=PromptFormat(style=config.student.prompt_style),
        batch_size=config.train.eval_batch_size,
        max_new_tokens=config.train.eval_max_new_tokens,
        out=folder / "test_predictions.jsonl",
        precision=config.train.eval_precision,  # as the trained students' test scoring
    )
    return {"test": result.summary()}


def distill_student(
    tcfg: TrainConfig,
    student_cfg: StudentConfig,
    examples: Sequence[Example],
    folder: Path,
    *,
    weights: Mapping[str, TokenWeights] | None = None,
    inputs: StageInputs | Mapping[str, Sequence[int]] | None = None,
    dev: Sequence[Example] = (),
    test: Sequence[Example] = (),
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Distil ``examples`` into the student with ``tcfg.method``: the student loaded and seeded, the
    method's stage examples (token ``weights`` by rationale key for methods that use them, the
    schedule's c_i(t) as ``inputs`` for progressive ones), then the trainer, writing to ``folder``.
    Shared by `kpod run`, `kpod distill` and the throughput benchmark."""
    from kpod.distill.methods import StageBuilder
    from kpod.distill.trainer import train
    from kpod.prompt import PromptFormat

    method = get_method(tcfg.method)
    if method.progressive and inputs is not None:
        stages = StageInputs.of(inputs).stages
        if stages > tcfg.epochs:
            raise ConfigError(
                f"the schedule's T = {stages} (schedule.stages) is larger than train.epochs = "
                f"{tcfg.epochs}: the student would never train on a whole rationale; plan the "
                "schedule with T <= epochs (the paper: epochs / 2)"
            )
    student = student_cfg.load(seed=tcfg.seed)
    fmt = PromptFormat(style=student_cfg.prompt_style)
    builder = StageBuilder(
        method,
        examples,
        student.tokenizer,
        kind=student.kind,
        fmt=fmt,
        weights=weights if method.token_weights else None,
        inputs=inputs,
        step_by_step_alpha=tcfg.step_by_step_alpha,
        seed=tcfg.seed,
        mcc_alpha=tcfg.mcc_kd_alpha,
    )
    return train(
        tcfg, student, builder, folder, dev=dev, test=test, fmt=fmt, progress=progress, resume=resume
    )


def distill_step(
    config: PipelineConfig,
    method: str,
    data_dir: Path,
    train_path: Path,
    weights_dir: Path | None,
    schedule_dir: Path | None,
    folder: Path,
) -> dict[str, Any]:
    import dataclasses

    m = get_method(method)
    result = distill_student(
        dataclasses.replace(config.train, method=method),
        config.student,
        _read_examples(train_path),
        folder,
        weights=_read_weights(weights_dir, config.weighting)
        if (weights_dir is not None and m.token_weights)
        else None,
        inputs=load_schedule_inputs(schedule_dir) if schedule_dir is not None else None,
        dev=_read_examples(data_dir / "dev.jsonl"),
        test=_read_examples(data_dir / "test.jsonl"),
    )
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # finished: the student is saved
    return result.summary()


def schedule_variant(method: str) -> str | None:
    """The schedule step a method trains with (``None``: no schedule)."""
    m = get_method(method)
    if not m.progressive:
        return None
    return "schedule" + ("" if m.weighted_difficulty else "-uniform") + ("" if m.diversity else "-nodiv")


def run_data_step(runner: Runner, config: PipelineConfig) -> dict[str, Any]:
    """The data step; its key covers the settings and the content of the files it reads."""
    inputs = input_files(config.data)
    runner.manifest["inputs"] = inputs
    return runner.step(
        "data", {"data": config.data, "inputs": inputs}, [], lambda f: data_step(config.data, f)
    )


@dataclass
class PlannedStep:
    """One step of a run after the data step: its name, the settings its key covers, the steps it
    reads from, the function that runs it in its folder, and under which name its ``test`` result
    goes into the run's results (``untrained`` or the method; ``None`` for steps without one)."""

    name: str
    settings: Any
    upstream: list[str]
    fn: Callable[[Path], dict[str, Any]]
    result_as: str | None = None


def plan_steps(config: PipelineConfig, d: Path) -> list[PlannedStep]:
    """The steps after ``data``, in the order they run one after another (each after its upstream)."""
    import dataclasses

    steps: list[PlannedStep] = []
    train_path, train_source = d / "data" / "train.jsonl", "data"
    if config.teacher.source == "server":
        steps.append(
            PlannedStep(
                "teacher", config.teacher, ["data"], lambda f: teacher_step(config.teacher, train_path, f)
            )
        )
        train_path, train_source = d / "teacher" / "train.jsonl", "teacher"
    methods = [get_method(m) for m in config.methods]
    if any(m.needs_weights for m in methods):
        steps.append(
            PlannedStep(
                "weights",
                config.weighting.training_settings(),
                [train_source],
                lambda f: weights_step(config.weighting, train_path, f, config.report.heatmaps),
            )
        )
    for variant in sorted({v for v in map(schedule_variant, config.methods) if v}):
        uniform = "-uniform" in variant
        scfg = dataclasses.replace(config.schedule, beta=0.0) if "-nodiv" in variant else config.schedule
        steps.append(
            PlannedStep(
                variant,
                {
                    "schedule": scfg,
                    "difficulty": config.difficulty,
                    "student": config.student.name,
                    **({} if uniform else {"read_weights": config.weighting.read_settings()}),
                },
                [train_source] + ([] if uniform else ["weights"]),
                lambda f, s=scfg, u=uniform: schedule_step(
                    s,
                    config.difficulty,
                    config.student.name,
                    _read_examples(train_path),
                    None if u else _read_weights(d / "weights", config.weighting),
                    f,
                ),
            )
        )
    if config.eval_untrained:
        steps.append(
            PlannedStep(
                "eval-untrained",
                {
                    "student": config.student,
                    "max_new_tokens": config.train.eval_max_new_tokens,
                    "precision": config.train.eval_precision,
                },
                ["data"],
                lambda f: eval_untrained_step(config, d / "data" / "test.jsonl", f),
                result_as="untrained",
            )
        )
    for method in config.methods:
        m = get_method(method)
        variant = schedule_variant(method)
        steps.append(
            PlannedStep(
                f"train-{method}",
                {
                    "train": dataclasses.replace(config.train, method=method),
                    "student": config.student,
                    **({"read_weights": config.weighting.read_settings()} if m.token_weights else {}),
                },
                [train_source] + (["weights"] if m.token_weights else []) + ([variant] if variant else []),
                lambda f, method=method, variant=variant: distill_step(
                    config, method, d / "data", train_path, d / "weights", d / variant if variant else None, f
                ),
                result_as=method,
            )
        )
    return steps


@holds_lock(lambda a: a["config"].directory, directory=True)
def run_pipeline(
    config: PipelineConfig, config_data: dict[str, Any], echo: Callable[[str], None] = print
) -> dict:
    """Run every step of ``config``; returns {method: test summary} (``untrained`` included).

    The run directory's writer lock is held throughout: a second `kpod run` on it is refused."""
    runner = Runner(config, config_data, echo)
    run_data_step(runner, config)
    steps = plan_steps(config, runner.dir)
    for step in steps:
        runner.key(step.name, step.settings, step.upstream)
    side = [n for n in side_step_names(steps) if not runner.finished(n)]
    main_left = [s for s in steps if s.name not in side and not runner.finished(s.name)]
    if resolve_jobs(config.jobs) < 2 or not main_left:
        side = []
    outputs = _run_streams(runner, config, steps, side, echo)
    results = {s.result_as: outputs[s.name].get("test") for s in steps if s.result_as is not None}
    from kpod.report import write_report

    report = write_report(runner.dir, config, results)
    runner.manifest["report"] = str(report)
    runner.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runner.save_manifest()
    return {"results": results, "report": str(report)}


def _run_streams(
    runner: Runner,
    config: PipelineConfig,
    steps: list[PlannedStep],
    side: list[str],
    echo: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Run ``steps``: those named in ``side`` in a second process (:mod:`kpod.streams`), started as
    soon as the steps they read from are done, the others here; returns every step's result."""
    import torch

    from kpod.config import to_dict

    outputs: dict[str, dict[str, Any]] = {}
    needed = {u for s in steps if s.name in side for u in s.upstream}
    threads = torch.get_num_threads()
    process: SideProcess | None = None
    try:
        for step in steps:
            if step.name in side:
                continue
            if process is None and side and needed <= {"data", *outputs}:
                shared = max(1, threads // 2)
                process = SideProcess(
                    to_dict(config), runner.keys, runner.dir, side, shared, _side_echo(echo)
                )
                echo(
                    f"[{', '.join(side)}] side by side in process {process.process.pid}, "
                    f"{shared} thread(s) each (jobs: 2); log: {process.log_path}"
                )
                share_threads(shared)
            outputs[step.name] = runner.step(step.name, step.settings, step.upstream, step.fn)
    except BaseException:
        if process is not None:
            process.stop()
        raise
    finally:
        stop_sharing()
    if process is None:  # the main stream ended with the steps the side ones read from: run them here
        for step in steps:
            if step.name in side:
                outputs[step.name] = runner.step(step.name, step.settings, step.upstream, step.fn)
        return outputs
    if not process.done():
        echo(f"waiting for the side process ({', '.join(side)})")
    code = process.wait()
    if code != 0:
        raise process.failure(code)
    for name in side:
        outputs[name] = runner.record(name)
    return outputs


def _side_echo(echo: Callable[[str], None]) -> Callable[[str], None]:
    """The side process's lines, printed without breaking this process's progress bar."""
    if echo is not print:
        return echo
    from tqdm import tqdm

    return tqdm.write


def report_from_run(run_dir: str | Path) -> Path:
    """(Re)write the report of an existing run directory from what its steps left."""
    from kpod.report import write_report

    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{run}: no manifest.json here; is it a `kpod run` directory?")
    recorded = json.loads(manifest_path.read_text())["config"]
    config = from_dict(PipelineConfig, recorded.get("resolved", recorded))
    results: dict[str, Any] = {}
    untrained = run / "eval-untrained" / "stage.json"
    if untrained.is_file():
        results["untrained"] = json.loads(untrained.read_text()).get("result", {}).get("test")
    for path in sorted(run.glob("train-*/training.json")):
        trained = json.loads(path.read_text())
        results[trained["method"]] = test_summary(trained.get("test"))
    return write_report(run, config, results)
