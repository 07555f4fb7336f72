"""The ``kpod`` command: one subcommand per pipeline step.

Errors a user can fix (a bad file, record, config key or server) print one line,
``kpod: error: <where>: <what>``, and exit with code 2; there is no traceback.

Every command that writes takes its output's writer lock (:mod:`kpod.lock`) first, before any slow
loading, so a second process on the same store, run directory or output is refused at once (exit 2,
naming the holder's PID) or, with ``--wait``, queues behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from kpod import __version__
from kpod.config import add_config_options, config_from_args
from kpod.errors import KpodError

DESCRIPTION = """\
KPOD: keypoint-based progressive chain-of-thought distillation (Feng et al., ICML 2024).

Distil the step-by-step reasoning of a teacher LLM into a small student: learn per-token
weights that single out keypoint tokens, then train the student on more and more of each
rationale, stage by stage.
"""

ENVIRONMENT = """\
environment:
  KPOD_CACHE                  where converted checkpoints and measurements are kept (~/.cache/kpod)
  KPOD_GENERATION_PRECISION   fp32 or bf16 for generation, instead of measuring which is faster here
  KPOD_FAST_MALLOC            0 keeps the C library's malloc; by default the commands that run a model
                              restart once with jemalloc preloaded where it is installed (Linux)
"""


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise KpodError(f"--columns expects FIELD=COLUMN pairs separated by commas, got '{part}'")
        key, value = part.split("=", 1)
        mapping[key.strip()] = value.strip()
    return mapping


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _batch_size(text: str) -> int | str:
    """A positive integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}")
    return value


def _add_rescale_options(parser: argparse.ArgumentParser) -> None:
    """How --weights enter difficulty or the loss (``weighting.rescale`` in a `kpod run` config)."""
    from kpod.weighting.config import READ_SETTINGS, WeightingConfig

    skip = tuple(f for f in WeightingConfig.__dataclass_fields__ if f not in READ_SETTINGS)
    add_config_options(
        parser, WeightingConfig, "weighting", skip=skip, types={"rescale_floor": _unit_interval}
    )


def _add_set_option(parser: argparse.ArgumentParser, *sections: str) -> None:
    keys = " or ".join(f"{s}.KEY" for s in sections)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"set any config value ({keys}=VALUE, as in a `kpod run` config; the options above win)",
    )


def _config_sections(args: argparse.Namespace, *sections: str) -> dict[str, dict]:
    """The ``--set`` values by section; an unknown section is an error naming the known ones."""
    from kpod.config import apply_overrides

    data = apply_overrides({}, args.set or [])
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise KpodError(f"--set: unknown section '{unknown[0]}'; known: {', '.join(sections)}")
    return {s: data.get(s, {}) for s in sections}


_held_locks = ExitStack()  # the writer locks of the running command; released when it returns


def _hold(path: Path | None, *, directory: bool) -> None:
    """Take ``path``'s writer lock for the rest of this command (re-entrant: the step function
    called next takes the same lock again without waiting)."""
    from kpod.lock import writer_lock

    _held_locks.enter_context(writer_lock(path, directory=directory))


def _add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another process is writing the same output, wait for it to finish instead of "
        "stopping at once (exit code 2)",
    )


def _add_load_options(p: argparse.ArgumentParser) -> None:
    from kpod.data.loaders import FORMATS

    p.add_argument("path", help="data file (JSON, JSONL, CSV or XML)")
    p.add_argument("--format", choices=FORMATS, help="source format (default: detected from the file)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip records that cannot be read and report how many and why (default: stop at the first)",
    )
    p.add_argument(
        "--keep-calculator",
        action="store_true",
        help="GSM8K: keep calculator notes like <<48/2=24>> in the rationales (default: removed)",
    )
    p.add_argument(
        "--columns",
        help="generic format: FIELD=COLUMN pairs, e.g. question=q,answer=a,rationale=r",
    )


def _load(args: argparse.Namespace):
    from kpod.data.loaders import load_examples

    return load_examples(
        args.path,
        args.format,
        skip_invalid=args.skip_invalid,
        keep_calculator=args.keep_calculator,
        columns=_parse_columns(args.columns),
    )


def cmd_data_stats(args: argparse.Namespace) -> int:
    from kpod.data.stats import compute_stats, format_stats

    examples, report = _load(args)
    tokenizer = None
    if args.tokenizer:
        from kpod.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    stats = compute_stats(examples, report, tokenizer)
    print(json.dumps(stats, ensure_ascii=False) if args.json else format_stats(stats))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from kpod.data.synthetic import arithmetic_examples, gsm_symbolic_records
    from kpod.io import write_jsonl

    if args.kind == "arithmetic":
        rows = [e.to_dict() for e in arithmetic_examples(args.n, args.seed)]
    else:
        rows = [
            {"question": r["question"], "answer": r["answer"]}
            for r in gsm_symbolic_records(args.n, args.seed)
        ]
    write_jsonl(args.out, rows)
    fmt = "kpod" if args.kind == "arithmetic" else "gsm8k"
    print(f"wrote {len(rows)} {args.kind} problems to {args.out} (format: {fmt})")
    return 0


def cmd_teacher_generate(args: argparse.Namespace) -> int:
    import asyncio

    from kpod.io import write_jsonl
    from kpod.teacher.client import ChatClient, RetryPolicy, api_key_from_env
    from kpod.teacher.config import TeacherConfig
    from kpod.teacher.generate import (
        GenerationSettings,
        TeacherPrompt,
        filter_rationales,
        generate_rationales,
        questions_of,
    )
    from kpod.teacher.store import RationaleStore

    _hold(args.store, directory=False)
    examples, report = _load(args)
    questions = questions_of(examples)[: args.limit] if args.limit else questions_of(examples)
    cfg = config_from_args(TeacherConfig, args, "teacher")
    settings = GenerationSettings(cfg.n_samples, cfg.temperature, cfg.max_tokens, cfg.concurrency)
    prompt = TeacherPrompt(system=args.system or None)
    if (cfg.base_url is None) == (args.local_model is None):
        raise KpodError("name exactly one teacher: --base-url URL --model NAME, or --local-model PATH")
    if cfg.base_url is not None:
        if not cfg.model:
            raise KpodError("--base-url needs --model, the teacher model's name on that server")
        teacher = ChatClient(
            cfg.base_url,
            cfg.model,
            api_key=api_key_from_env(cfg.api_key_env),
            policy=RetryPolicy(max_retries=args.max_retries, timeout_s=args.timeout),
            max_requests=args.max_requests,
        )
        server = cfg.base_url
    else:
        from kpod.teacher.local import LocalTeacher

        teacher = LocalTeacher(args.local_model)
        server = "local"

    async def run():
        try:
            with RationaleStore(args.store) as store:
                summary = await generate_rationales(
                    questions, teacher, store, settings, prompt, server=server, progress=not args.quiet
                )
                return summary, list(store)
        finally:
            await teacher.aclose()

    summary, records = asyncio.run(run())
    for line in summary.lines():
        print(line)
    kept, filtered = filter_rationales(
        records, teacher=teacher.model, prompt_hash=prompt.hash, keep_incorrect=args.keep_incorrect
    )
    wanted = {q.qid for q in questions}
    kept = [e for e in kept if e.qid in wanted]
    print(filtered.line())
    if args.out:
        write_jsonl(args.out, [e.to_dict() for e in kept])
        print(f"wrote {len(kept)} examples to {args.out} (format: kpod)")
    return 1 if summary.incomplete else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kpod.serve import serve
    from kpod.teacher.client import api_key_from_env

    serve(
        args.model,
        host=args.host,
        port=args.port,
        model_id=args.model_id,
        api_key=api_key_from_env(args.api_key_env),
        fault_rate=args.inject_faults,
        precision=args.precision,
        delay_s=args.inject_delay,
        access_log=args.access_log,
    )
    return 0


def cmd_weights_train(args: argparse.Namespace) -> int:
    from kpod.weighting.train import WeightingConfig, train_weighting

    # Options left out on the command line (and in --set) take WeightingConfig's defaults.
    config = config_from_args(
        WeightingConfig, args, "weighting", _config_sections(args, "weighting")["weighting"]
    )
    _hold(args.out, directory=True)
    examples, report = _load(args)
    if args.limit:
        examples = examples[: args.limit]
    _, history = train_weighting(examples, config, out_dir=args.out)
    last = history[-1]
    print(
        f"trained on {len(examples)} rationales in {len(history)} steps; final loss {last['loss']:.3f}, "
        f"mean w {last['kept_ratio']:.3f}; weights in {args.out / 'weights.jsonl'}"
    )
    return 0


def _weights_and_examples(args: argparse.Namespace):
    from kpod.weighting.weights import load_weights

    examples, _ = _load(args)
    rows = load_weights(args.weights)
    return examples, rows


def cmd_weights_show(args: argparse.Namespace) -> int:
    from kpod.io import atomic_open
    from kpod.weighting.visualise import html_heatmap, terminal_heatmap
    from kpod.weighting.weights import rationale_key

    examples, rows = _weights_and_examples(args)
    chosen = [e for e in examples if rationale_key(e) in rows]
    if args.qid:
        chosen = [e for e in chosen if e.qid in set(args.qid)]
    chosen = chosen[: args.n]
    if not chosen:
        raise KpodError(f"none of the examples in {args.path} has weights in {args.weights}")
    if args.html:
        with atomic_open(args.html) as f:
            f.write(html_heatmap(chosen, rows))
        print(f"wrote a heat-map of {len(chosen)} rationales to {args.html}")
    else:
        for e in chosen:
            print(f"{e.qid}: {e.question}")
            print(terminal_heatmap(e, rows[rationale_key(e)]))
            print()
    return 0


def cmd_weights_eval(args: argparse.Namespace) -> int:
    from kpod.weighting.evaluate import keypoint_metrics, token_class_metrics

    examples, rows = _weights_and_examples(args)
    result = token_class_metrics(examples, rows)
    if any(e.keypoints for e in examples):
        result.update(keypoint_metrics(examples, rows))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24s} {v}")
    return 0


def cmd_schedule_plan(args: argparse.Namespace) -> int:
    from kpod.pipeline import schedule_step
    from kpod.progressive.schedule import DifficultyConfig, Schedule, ScheduleConfig
    from kpod.report import schedule_table
    from kpod.weighting.train import WeightingConfig
    from kpod.weighting.weights import load_weights

    _hold(args.out, directory=True)
    examples, _ = _load(args)
    examples = [e for e in examples if e.steps]
    if not examples:
        raise KpodError(f"{args.path} has no rationales to schedule")
    sections = _config_sections(args, "schedule", "difficulty")
    if getattr(args, "schedule.stages", None) is None and "stages" not in sections["schedule"]:
        sections["schedule"]["stages"] = max(1, args.epochs // 2)
    config = config_from_args(ScheduleConfig, args, "schedule", sections["schedule"])
    difficulty = config_from_args(DifficultyConfig, args, "difficulty", sections["difficulty"])
    read = config_from_args(WeightingConfig, args, "weighting")
    weights = None if args.weights is None else load_weights(args.weights, read.rescale, read.rescale_floor)
    schedule_step(config, difficulty, args.student, examples, weights, args.out, seed=args.seed)
    schedule = Schedule.from_dict(json.loads((args.out / "schedule.json").read_text()))
    print(schedule_table(schedule))
    print(
        f"schedule of {len(examples)} rationales in {args.out / 'schedule.json'}; "
        f"plot in {args.out / 'schedule.png'}"
    )
    return 0


def cmd_schedule_show(args: argparse.Namespace) -> int:
    from kpod.progressive.schedule import Schedule
    from kpod.report import plot_schedule, schedule_table

    path = args.schedule / "schedule.json" if args.schedule.is_dir() else args.schedule
    if not path.is_file():
        raise KpodError(f"no schedule at {path}; make one with `kpod schedule plan`")
    plan = json.loads(path.read_text())
    schedule = Schedule.from_dict(plan)
    scored = path.parent / "difficulty.jsonl"
    if not schedule.n_steps and "keys" in plan and scored.is_file():
        # Written before schedules recorded their step counts: the difficulty scores beside have them.
        import dataclasses

        from kpod.progressive.difficulty import read_difficulties

        steps = {key: len(d) for key, d in read_difficulties(scored).items()}
        if all(key in steps for key in plan["keys"]):
            schedule = dataclasses.replace(schedule, n_steps=[steps[key] for key in plan["keys"]])
    print(schedule_table(schedule))
    print(f"plot in {plot_schedule(schedule, path.with_suffix('.png'))}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kpod.data.splits import gsm8k_paper_split
    from kpod.evaluate import evaluate, weights_fingerprint
    from kpod.models import load_model
    from kpod.prompt import PromptFormat

    _hold(args.out, directory=False)
    examples, _ = _load(args)
    if args.split:
        examples = gsm8k_paper_split(examples, args.split, args.split_file)
    if args.limit:
        examples = list({e.qid: e for e in examples}.values())[: args.limit]
    # auto: loaded in fp32, then the faster precision here (measured once per machine, cached)
    loaded = load_model(args.model, trainable=False, dtype="bf16" if args.precision == "bf16" else "fp32")
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        examples,
        kind=loaded.kind,
        fmt=PromptFormat(style=args.prompt_style),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        out=args.out,
        # with --out, an interrupted evaluation of the same model resumes from OUT.partial
        resume_key=weights_fingerprint(loaded.model) if args.out else None,
        precision=args.precision,
    )
    summary = {"model": args.model, "data": str(args.path), **result.summary()}
    if args.json:
        print(json.dumps(summary))
    else:
        lo, hi = summary["ci95"]
        acc = summary["accuracy"]
        print(f"accuracy {acc:.2f} % ({result.correct}/{result.n}), 95 % CI [{lo:.2f}, {hi:.2f}]")
        print(f"generated {result.generated_tokens} tokens in {result.seconds:.1f} s")
        if args.out:
            print(f"predictions in {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from kpod.config import apply_overrides, read_yaml
    from kpod.distill.config import TrainConfig
    from kpod.errors import ConfigError
    from kpod.models import StudentConfig
    from kpod.pipeline import distill_student
    from kpod.progressive.schedule import load_schedule_inputs
    from kpod.weighting.train import WeightingConfig
    from kpod.weighting.weights import load_weights

    data = read_yaml(args.config) if args.config else {}
    data = apply_overrides(data, args.set or [])
    unknown = sorted(set(data) - {"train", "student"})
    if unknown:
        raise ConfigError(f"{args.config or '--set'}: unknown section '{unknown[0]}'; known: student, train")
    config = config_from_args(TrainConfig, args, "train", data.get("train", {}))
    student_config = config_from_args(StudentConfig, args, "student", data.get("student", {}))
    _hold(args.out, directory=True)
    examples, _ = _load(args)
    dev = load_examples_quiet(args.dev) if args.dev else []
    test = load_examples_quiet(args.test) if args.test else []
    read = config_from_args(WeightingConfig, args, "weighting")
    weights = load_weights(args.weights, read.rescale, read.rescale_floor) if args.weights else None
    inputs = load_schedule_inputs(args.schedule) if args.schedule else None
    result = distill_student(
        config,
        student_config,
        examples,
        args.out,
        weights=weights,
        inputs=inputs,
        dev=dev,
        test=test,
        progress=not args.quiet,
        resume=args.resume,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under `accelerate launch`, one process reports
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(
            f"{result.method}: {result.steps} steps, {result.train_tokens} tokens, "
            f"{result.tokens_per_s:.0f} tokens/s; student in {result.student_dir}"
        )
        if result.test:
            print(f"test accuracy {result.test['accuracy']:.2f} % (95 % CI {result.test['ci95']})")
        if result.test_last and result.best_epoch != result.epochs - 1:
            last = result.test_last
            print(f"last epoch's model (not kept): {last['accuracy']:.2f} % (95 % CI {last['ci95']})")
    return 0


def load_examples_quiet(path: Path):
    from kpod.data.loaders import load_examples

    return load_examples(path)[0]


def cmd_run(args: argparse.Namespace) -> int:
    from kpod.config import apply_overrides, read_yaml, to_dict
    from kpod.pipeline import load_pipeline_config, run_pipeline

    config = load_pipeline_config(args.config, args.overrides)
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    _hold(config.directory, directory=True)
    print(f"kpod run {args.config} -> {config.directory}")
    out = run_pipeline(
        config,
        {"file": str(args.config), "overrides": args.overrides, "resolved": to_dict(config), "raw": raw},
    )
    print()
    print("test accuracy (95 % Wilson interval)")
    for name, r in out["results"].items():
        if r:
            lo, hi = r["ci95"]
            print(f"  {name:<26} {r['accuracy']:6.2f} %  [{lo:5.1f}, {hi:5.1f}]  ({r['correct']}/{r['n']})")
    from kpod.report import paired_comparisons, paired_verdict

    for comparison in paired_comparisons(config.directory):
        print(f"  {paired_verdict(comparison)}")
    print(f"report: {out['report']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kpod.pipeline import report_from_run

    print(f"report: {report_from_run(args.run_dir)}")
    return 0


def _command_group(sub, name: str, summary: str):
    """A command whose subcommands are required (``kpod data stats``, ``kpod weights train``...)."""
    group = sub.add_parser(name, help=summary).add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    group.required = True
    return group


def build_parser() -> argparse.ArgumentParser:
    # The config dataclasses give the options of the commands that run a pipeline step.
    from kpod.distill.config import TrainConfig
    from kpod.models import StudentConfig
    from kpod.progressive.schedule import DifficultyConfig, ScheduleConfig
    from kpod.weighting.config import READ_SETTINGS, WeightingConfig

    parser = argparse.ArgumentParser(
        prog="kpod",
        description=DESCRIPTION,
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kpod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data_sub = _command_group(sub, "data", "read, check and generate reasoning data")

    stats = data_sub.add_parser(
        "stats",
        help="examples, questions, steps, token lengths and problems of a data file",
        description="Load a data file the way training will, and report what it holds and what is wrong "
        "with it: examples and questions, steps per rationale, token lengths, the share of gold "
        "answers the answer extractor can read back, and problems found.",
    )
    _add_load_options(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.add_argument(
        "--tokenizer",
        help="report token lengths with this tokenizer (hub id, local path, or smollm2-135m-instruct)",
    )
    stats.set_defaults(func=cmd_data_stats)

    synth = data_sub.add_parser(
        "synth",
        help="generate offline problems: arithmetic (with keypoints) or gsm-symbolic",
        description="arithmetic: our seeded multi-step word problems whose rationales mark the ground-truth "
        "keypoint tokens (kpod JSONL). gsm-symbolic: GSM8K-style problems from reasoning-gym, "
        "written as GSM8K JSONL.",
    )
    synth.add_argument("kind", choices=("arithmetic", "gsm-symbolic"))
    synth.add_argument("-n", type=int, default=1000, help="number of problems (default 1000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", type=Path, required=True, help="output JSONL file")
    synth.set_defaults(func=cmd_data_synth)

    teacher_sub = _command_group(sub, "teacher", "generate teacher rationales")
    gen = teacher_sub.add_parser(
        "generate",
        help="ask a teacher LLM for step-by-step rationales, resumably",
        description="Prompt a teacher (any OpenAI-compatible server, or a local model) with the paper's "
        "zero-shot chain-of-thought prompt for every question of a data file, n samples each. "
        "Completions go to an append-only store (--store) that survives a crash; a re-run "
        "generates only what is missing. Rationales whose final answer matches the gold answer "
        "are written to --out as kpod JSONL. Exit code 1 when samples were left undone.",
    )
    _add_load_options(gen)
    # The server and generation settings: TeacherConfig's fields (teacher.* in a `kpod run` config).
    from kpod.teacher.config import TeacherConfig

    add_config_options(
        gen, TeacherConfig, "teacher", skip=("source",), flags={"n_samples": ["-n", "--n-samples"]}
    )
    gen.add_argument(
        "--local-model", help="use a local Hugging Face model as the teacher instead of a server"
    )
    gen.add_argument("--store", type=Path, required=True, help="append-only JSONL store of completions")
    gen.add_argument("--out", type=Path, help="write the answer-filtered rationales here (kpod JSONL)")
    gen.add_argument("--max-requests", type=int, help="request budget of this run, retries included")
    gen.add_argument("--max-retries", type=int, default=6, help="retries per request (default 6)")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    gen.add_argument("--limit", type=int, help="only the first N questions")
    gen.add_argument("--system", help="the teacher's system message (default: asks for the answer phrase)")
    gen.add_argument(
        "--keep-incorrect",
        action="store_true",
        help="also keep rationales whose answer is wrong (default: drop)",
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_wait_option(gen)
    gen.set_defaults(func=cmd_teacher_generate)

    weights_sub = _command_group(sub, "weights", "token weighting by mask learning (paper section 3.3)")
    wtrain = weights_sub.add_parser(
        "train",
        help="learn per-token keypoint weights for every rationale of a data file",
        description="Train the mask generator (the student's embeddings, one self-attention layer, a "
        "two-layer MLP) so that an answer predictor still finds the answer from the masked "
        "rationale while as few tokens as possible are kept (Eqs. 2-7). Writes the module and "
        "weights.jsonl (per-token weights with character offsets) to --out.",
    )
    _add_load_options(wtrain)
    wtrain.add_argument("--out", type=Path, required=True, help="output directory")
    add_config_options(
        wtrain,
        WeightingConfig,
        "weighting",
        skip=READ_SETTINGS,
        flags={"n_prefixes": ["--n-prefixes", "--prefixes"]},
    )
    _add_set_option(wtrain, "weighting")
    wtrain.add_argument("--limit", type=int, help="only the first N rationales")
    _add_wait_option(wtrain)
    wtrain.set_defaults(func=cmd_weights_train)

    wshow = weights_sub.add_parser(
        "show",
        help="print rationales with tokens shaded by weight, or write an HTML heat-map",
        description="Terminal colouring (darker red = larger weight) or, with --html, a page like the "
        "paper's Figure 2.",
    )
    _add_load_options(wshow)
    wshow.add_argument("weights", type=Path, help="weights.jsonl or the directory of `kpod weights train`")
    wshow.add_argument("-n", type=int, default=5, help="how many rationales (default 5)")
    wshow.add_argument("--qid", action="append", help="show this question id (repeatable)")
    wshow.add_argument("--html", type=Path, help="write an HTML heat-map here instead of printing")
    wshow.set_defaults(func=cmd_weights_show)

    weval = weights_sub.add_parser(
        "eval",
        help="measure the weights: keypoint ROC-AUC (synthetic data), digits/operators vs frequent words",
    )
    _add_load_options(weval)
    weval.add_argument("weights", type=Path, help="weights.jsonl or the directory of `kpod weights train`")
    weval.add_argument("--json", action="store_true", help="print one JSON object")
    weval.set_defaults(func=cmd_weights_eval)

    sched_sub = _command_group(sub, "schedule", "the in-rationale progressive schedule (paper Eqs. 8-13)")
    splan = sched_sub.add_parser(
        "plan",
        help="score step difficulty with the student and plan c_i(t) for every stage",
        description="Score every step's difficulty with the pretrained student (Eq. 8, token weights "
        "softmax-normalised within the step), cluster the questions, and plan which rationales "
        "move steps from input to output at each stage (Eqs. 10-13, Greedy+Max). Writes "
        "difficulty.jsonl (resumable), schedule.json and schedule.png to --out.",
    )
    _add_load_options(splan)
    splan.add_argument("--out", type=Path, required=True, help="output directory")
    splan.add_argument(
        "--weights", type=Path, help="weights.jsonl or its directory (default: uniform weights)"
    )
    _add_rescale_options(splan)
    splan.add_argument(
        "--student", default="smollm2-135m-instruct", help="the pretrained student that scores"
    )
    splan.add_argument("--epochs", type=int, default=20, help="training epochs; T = epochs / 2 (default 20)")
    add_config_options(
        splan,
        ScheduleConfig,
        "schedule",
        flags={
            "initial_fraction": ["--initial-fraction", "--c0"],
            "n_clusters": ["--n-clusters", "--clusters"],
        },
    )
    add_config_options(splan, DifficultyConfig, "difficulty")
    _add_set_option(splan, "schedule", "difficulty")
    splan.add_argument("--seed", type=int, default=0)
    _add_wait_option(splan)
    splan.set_defaults(func=cmd_schedule_plan)
    sshow = sched_sub.add_parser("show", help="print a planned schedule and (re)draw its plot")
    sshow.add_argument("schedule", type=Path, help="schedule.json or its directory")
    sshow.set_defaults(func=cmd_schedule_show)

    ev = sub.add_parser(
        "eval",
        help="answer accuracy of any model on a data file",
        description="Batched greedy generation from the question alone (the model writes the rationale "
        "and the answer phrase), answers read by the data layer's extractor; accuracy with a 95 %% "
        "Wilson interval; every prediction written with --out.",
    )
    ev.add_argument("model", help="local directory, hub id, or smollm2-135m-instruct")
    _add_load_options(ev)
    ev.add_argument(
        "--split", choices=("dev", "test"), help="GSM8K: the paper's dev or test part of test.jsonl"
    )
    ev.add_argument("--split-file", type=Path, help="paper_split.json (default: beside the data file)")
    ev.add_argument("--limit", type=int, help="only the first N questions")
    ev.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="rows generated together; auto: as many as a fixed key/value-cache budget allows, up to "
        "128 (kpod.kv_cache.auto_batch_size; default auto)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--prompt-style", choices=("paper", "chat"), default="paper")
    ev.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="generation precision; auto: the faster one here, measured once and cached (default auto)",
    )
    ev.add_argument(
        "--out",
        type=Path,
        help="write every prediction to this JSONL file; generations are also recorded batch by batch "
        "in OUT.partial, so an interrupted evaluation of the same model resumes",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _add_wait_option(ev)
    ev.set_defaults(func=cmd_eval)

    run = sub.add_parser(
        "run",
        help="the whole pipeline from one YAML config (resumable)",
        description="Data, teacher rationales, token weights, step difficulty and schedule, distillation "
        "of every listed method, evaluation and an HTML report, in order, in the run directory. Running "
        "it again skips finished steps; a changed setting re-runs that step and everything after it. "
        "On a CPU (jobs: auto) the steps that read only the data (eval-untrained, std-cot and the other "
        "methods without token weights or a schedule) run in a second process beside the others, "
        "each with half the threads; jobs=1 keeps one process. "
        "Ready configs: configs/quickstart.yaml (offline), gsm8k.yaml, asdiv.yaml, paper-llama7b-gsm8k.yaml.",
        epilog="example: kpod run configs/quickstart.yaml train.epochs=2 methods=[std-cot,kpod]",
    )
    run.add_argument("config", type=Path, help="YAML config (see configs/)")
    run.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. train.lr=5e-4"
    )
    _add_wait_option(run)
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser(
        "report",
        help="(re)write the HTML report of a run directory",
        description="Rebuild RUN_DIR/report.html and its PNG plots from the artifacts of a `kpod run` "
        "(finished or not): accuracy per method with 95 %% intervals, data statistics, keypoint "
        "heat-maps, the schedule, training loss, example predictions, stage timings and the config.",
    )
    rep.add_argument("run_dir", type=Path, help="the run directory (holds manifest.json)")
    rep.set_defaults(func=cmd_report)

    dist = sub.add_parser(
        "distill",
        help="train a student with KPOD, an ablation or a baseline (one loop for all)",
        description="Distil rationales into a student. The method (train.method) is a config value: "
        "kpod, std-cot, answer-only, step-by-step, kpod-no-weights, kpod-no-progressive, "
        "kpod-no-diversity, kpod-uniform-difficulty. kpod needs --weights and --schedule. "
        "After a crash, run it again with --resume and the same --out to continue from the newest "
        "checkpoint. Several processes or GPUs: `accelerate launch -m kpod.cli distill ...`.",
    )
    _add_load_options(dist)
    dist.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, student/)")
    dist.add_argument("--config", type=Path, help="YAML with 'student:' and 'train:' sections")
    dist.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=4 --set student.finetune=full",
    )
    add_config_options(dist, TrainConfig, "train")
    add_config_options(dist, StudentConfig, "student", flags={"name": ["--student"]})
    dist.add_argument("--weights", type=Path, help="weights.jsonl from `kpod weights train`")
    _add_rescale_options(dist)
    dist.add_argument("--schedule", type=Path, help="schedule.json from `kpod schedule plan`")
    dist.add_argument("--dev", type=Path, help="dev data: accuracy after each stage picks the best one")
    dist.add_argument("--test", type=Path, help="test data: scored once, at the end")
    dist.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint (mid-stage included)",
    )
    dist.add_argument("--json", action="store_true", help="print the result as one JSON object")
    dist.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_wait_option(dist)
    dist.set_defaults(func=cmd_distill)

    srv = sub.add_parser(
        "serve",
        help="serve a local model over an OpenAI-compatible API",
        description="Serve any local model (a distilled student included) at /v1/chat/completions, "
        "streaming included, so that OpenAI clients can talk to it.",
    )
    srv.add_argument("model", help="local directory, hub id, or smollm2-135m-instruct")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--model-id", help="the model name clients use (default: MODEL)")
    srv.add_argument(
        "--api-key-env", metavar="VAR", help="require the API key held in this environment variable"
    )
    srv.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: the faster of fp32 and bf16 here for one request at a time (measured once, cached)",
    )
    srv.add_argument(
        "--inject-faults",
        type=float,
        default=0.0,
        metavar="RATE",
        help="for testing clients: answer this share of requests with HTTP 429/500 or a dropped connection",
    )
    srv.add_argument(
        "--inject-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="for testing clients: hold every chat reply this long (a slow teacher)",
    )
    srv.add_argument("--access-log", action="store_true", help="print one line per request to standard error")
    srv.set_defaults(func=cmd_serve)
    return parser


# The commands that run a model over many batches: started from the command line, they restart
# themselves once on jemalloc where it is installed (kpod.allocator.restart_on_fast_allocator),
# since CPU training under glibc's malloc slows as its heap fragments. KPOD_FAST_MALLOC=0 opts out.
MODEL_COMMANDS = frozenset({cmd_weights_train, cmd_schedule_plan, cmd_eval, cmd_distill, cmd_run, cmd_serve})


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kpod`` command. ``argv`` given (a notebook, a test): parsed and run in this process as
    it is; ``None`` (the console script): ``sys.argv``, and a model command may first restart the
    process with a faster allocator preloaded (``MODEL_COMMANDS``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from kpod.lock import set_wait

    set_wait(getattr(args, "wait", False))
    try:
        if argv is None and args.func in MODEL_COMMANDS:
            from kpod.allocator import restart_on_fast_allocator

            restart_on_fast_allocator()
        return int(args.func(args) or 0)
    except KpodError as err:
        print(f"kpod: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kpod: interrupted", file=sys.stderr)
        return 130
    finally:
        _held_locks.close()
        set_wait(False)


if __name__ == "__main__":
    sys.exit(main())
