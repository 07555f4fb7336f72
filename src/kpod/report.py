"""Plots (PNG) and the HTML run report, for people who would rather look than read.

``write_report`` turns a ``kpod run`` directory into ``report.html`` (one self-contained file: the
plots are embedded as base64 PNG, the styles inline, no script, nothing fetched) and leaves the
PNG files beside it: the config and data statistics, keypoint heat-maps, the schedule, training
loss per stage, every method's test accuracy with its 95 % interval and paired with std-cot (McNemar),
and example predictions.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

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
    """One line per stage: budget, achieved difficulty, questions advanced, cluster spread, and
    (where the schedule records its step counts) the share of steps given as input and of
    rationales generated whole, then how often the first steps are trained."""
    total = schedule.total_difficulty or 1.0
    exposure = schedule.exposure() if len(schedule.n_steps) == len(schedule.c) else None
    extra = "  input steps  whole" if exposure else ""
    lines = [f"stage  budget/B  achieved/B  advanced{extra}  by cluster"]
    for t, (b, a, n, counts) in enumerate(
        zip(schedule.budget, schedule.achieved, schedule.advanced, schedule.cluster_counts, strict=True)
    ):
        shares = ""
        if exposure:
            shares = f"  {exposure['input_share'][t]:11.2f}  {exposure['whole_share'][t]:5.2f}"
        lines.append(f"{t:5d}  {b / total:8.3f}  {a / total:10.3f}  {n:8d}{shares}  {counts}")
    if exposure:
        lines.append(
            f"a rationale's first step is generated in {100 * exposure['first_step_share']:.0f} % of stages "
            f"1..{len(schedule.budget) - 1} (epochs 1..T), its last in every one; each epoch after T trains "
            "whole rationales"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_colour(name: str) -> str:
    """One colour per kind of method in every accuracy plot: grey untrained, red kpod and its
    ablations and variants, blue the baselines."""
    return "#999999" if name == "untrained" else "#c0392b" if name.startswith("kpod") else "#2e86c1"


def plot_accuracy(results: dict[str, dict[str, Any] | None], path: Path) -> Path:
    """Test accuracy of every method with its 95 % Wilson interval."""
    plt = _pyplot()
    names = [n for n, r in results.items() if r]
    acc = [results[n]["accuracy"] for n in names]
    lo = [results[n]["accuracy"] - results[n]["ci95"][0] for n in names]
    hi = [results[n]["ci95"][1] - results[n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(names)) + 1, 4), constrained_layout=True)
    ax.bar(names, acc, yerr=[lo, hi], capsize=6, color=[method_colour(n) for n in names])
    for i, (a, h) in enumerate(zip(acc, hi, strict=True)):
        ax.text(i, a + h + 0.8, f"{a:.1f}", ha="center", va="bottom")  # above the error bar
    n_test = results[names[0]]["n"] if names else 0
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Answer accuracy on {n_test} test questions (95 % Wilson interval)")
    ax.set_ylim(0, min(108, max([a + h for a, h in zip(acc, hi, strict=True)] + [10]) * 1.15))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training loss per step for each method, with stage boundaries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for name, rows in logs.items():
        rows = [r for r in rows if r.get("loss") == r.get("loss")]  # drop NaN (empty steps)
        if not rows:
            continue
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=1.2)
        ends = [r["step"] for r, nxt in zip(rows, rows[1:], strict=False) if nxt["stage"] != r["stage"]]
        for x in ends:
            ax.axvline(x, color="#bbbbbb", lw=0.6, ls=":")
    ax.set_xlabel("optimiser step (dotted lines: stage ends)")
    ax.set_ylabel("weighted token NLL")
    ax.set_title("Training loss")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    import base64

    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _step_note(step: dict[str, Any]) -> str:
    """How a step ran in the last `kpod run`: skipped, or ran (in the side process, with how many
    threads: ``jobs: 2`` runs steps side by side, so their seconds overlap)."""
    if step.get("skipped"):
        return "skipped (up to date)"
    where = " in the side process" if step.get("side") else ""
    threads = f", {step['threads']} thread(s)" if step.get("threads") else ""
    return f"ran{where}{threads}"


def _predictions_html(rows: list[dict[str, Any]], n: int) -> str:
    out = []
    for correct, title in ((True, "right"), (False, "wrong")):
        picked = [r for r in rows if bool(r["correct"]) is correct][:n]
        out.append(f"<h4>{title} ({sum(bool(r['correct']) is correct for r in rows)} of {len(rows)})</h4>")
        for r in picked:
            out.append(
                f'<div class="pred {title}"><div class="q">{html.escape(r["question"])}</div>'
                f'<div class="gen">{html.escape(r["generated"].strip())}</div>'
                f'<div class="meta">gold {html.escape(str(r["gold"]))} · predicted '
                f"{html.escape(str(r['predicted']))}</div></div>"
            )
    return "".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #222; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
table { border-collapse: collapse; margin: 0.5rem 0; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: left; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
.pred { border-left: 4px solid #ccc; padding: 0.3rem 0.8rem; margin: 0.6rem 0; }
.pred.right { border-color: #27ae60; } .pred.wrong { border-color: #c0392b; }
.gen { font-family: ui-monospace, monospace; font-size: 0.9rem;
       white-space: pre-wrap; word-break: break-word; }
.meta, .q { color: #555; font-size: 0.9rem; }
.heat .ex { border-bottom: 1px solid #ddd; padding: 0.6rem 0; line-height: 1.9; }
.heat .r { font-family: ui-monospace, monospace; font-size: 0.9rem; }
.heat .t { border-radius: 3px; padding: 0 1px; }
"""


def paired_comparisons(run_dir: Path, baseline: str = "std-cot") -> list[dict[str, Any]]:
    """Every trained method of a run against ``baseline`` on the same test questions, from their
    saved predictions (``train-<method>/test_predictions.jsonl``): a gap between two accuracies
    with overlapping intervals can still be real, and one inside them can be noise; the paired view
    (:func:`kpod.stats.paired_comparison`) says which. Empty when the baseline was not trained."""
    from kpod.stats import paired_comparison

    def correct(method: str) -> dict[str, bool]:
        rows = _read_jsonl(Path(run_dir) / f"train-{method}" / "test_predictions.jsonl")
        return {r["qid"]: bool(r["correct"]) for r in rows}

    base = correct(baseline)
    if not base:
        return []
    out = []
    for path in sorted(Path(run_dir).glob("train-*/test_predictions.jsonl")):
        method = path.parent.name.removeprefix("train-")
        if method == baseline:
            continue
        other = correct(method)
        if set(other) & set(base):
            out.append({"method": method, "baseline": baseline, **paired_comparison(other, base)})
    return out


def paired_verdict(c: dict[str, Any]) -> str:
    """One line in plain words for a :func:`paired_comparisons` row."""
    gap, (low, high) = 100 * c["gap"], (100 * c["ci95"][0], 100 * c["ci95"][1])
    method, baseline = c["method"], c["baseline"]
    head = (
        f"{method} - {baseline}: {gap:+.1f} points [{low:+.1f}, {high:+.1f}] on {c['n']} questions "
        f"({c['a_only']} solved only by {method}, {c['b_only']} only by {baseline}; McNemar p = {c['p']:.3f})"
    )
    if c["p"] < 0.05:
        return f"{head}: a difference at the 5 % level (one seed: other seeds may differ)"
    if c["detectable"] is None:
        return f"{head}: the two answered every question alike"
    return (
        f"{head}: not distinguishable; this test set detects gaps of {100 * c['detectable']:.1f} points or "
        "more (80 % power), more seeds or questions for smaller ones"
    )


def write_report(run_dir: Path, config: Any, results: dict[str, dict[str, Any] | None]) -> Path:
    """``run_dir/report.html`` and its PNGs from a finished (or partly finished) ``kpod run``."""
    import re

    import yaml

    from kpod.config import to_dict

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>KPOD run: {html.escape(str(getattr(config, 'name', run_dir.name)))}</h1>"]
    # Accuracy first: the question people open the report for.
    acc_rows = [
        [
            name,
            f"{r['accuracy']:.2f}",
            f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]",
            f"{r['correct']}/{r['n']}",
        ]
        for name, r in results.items()
        if r
    ]
    parts.append("<h2>Test accuracy</h2>")
    if acc_rows:
        parts.append(_img(plot_accuracy(results, out / "accuracy.png"), "test accuracy per method"))
        parts.append(_table(acc_rows, ["method", "accuracy %", "95 % CI", "correct"]))
    paired = paired_comparisons(run_dir)
    if paired:
        parts.append("<h2>Paired with std-cot</h2>")
        parts.append(
            "<p>Each method against std-cot on the same test questions: the questions only one of the "
            "two solved decide the comparison (exact McNemar test); the interval resamples questions "
            "(one seed).</p>"
        )
        rows = [
            [
                c["method"],
                f"{100 * c['gap']:+.2f}",
                f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]",
                c["a_only"],
                c["b_only"],
                f"{c['p']:.3f}",
                "-" if c["detectable"] is None else f"{100 * c['detectable']:.1f}",
            ]
            for c in paired
        ]
        header = ["method", "gap (points)", "95 % CI", "only it", "only std-cot", "McNemar p"]
        parts.append(_table(rows, [*header, "detectable gap"]))
        parts.append("".join(f"<p>{html.escape(paired_verdict(c))}.</p>" for c in paired))
    stats_path = run_dir / "data" / "stats.json"
    manifest_path = run_dir / "manifest.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        flat = [[k, v] for k, v in stats.items() if not isinstance(v, dict | list)]
        flat += [
            [f"{k}.{k2}", v2]
            for k, v in stats.items()
            if isinstance(v, dict)
            for k2, v2 in v.items()
            if not isinstance(v2, dict | list)
        ]
        parts.append("<h2>Training data</h2>" + _table(flat, ["statistic", "value"]))
    heat = run_dir / "weights" / "heatmaps.html"
    if heat.exists():
        body = re.search(r"<body>(.*)</body>", heat.read_text(encoding="utf-8"), re.S)
        metrics = json.loads((run_dir / "weights" / "stage.json").read_text()).get("result", {})
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        parts.append("<h2>Keypoint token weights</h2>")
        parts.append(_table([[k, v] for k, v in shown.items()], ["measure", "value"]))
        if body:
            parts.append(
                f'<div class="heat">{body.group(1).replace("<h1>", "<h3>").replace("</h1>", "</h3>")}</div>'
            )
    for sched in sorted(run_dir.glob("schedule*/schedule.png")):
        target = out / f"{sched.parent.name}.png"
        shutil.copyfile(sched, target)
        parts.append(f"<h2>Schedule ({html.escape(sched.parent.name)})</h2>")
        parts.append(
            "<p>Budget D(t) against the difficulty reached, and rationales advanced per stage by "
            "question cluster.</p>" + _img(target, "schedule")
        )
        plan = sched.parent / "schedule.json"
        if plan.is_file():
            table = schedule_table(Schedule.from_dict(json.loads(plan.read_text())))
            parts.append(f"<pre>{html.escape(table)}</pre>")
    logs = {
        p.parent.name.removeprefix("train-"): _read_jsonl(p)
        for p in sorted(run_dir.glob("train-*/train_log.jsonl"))
    }
    if logs:
        parts.append(
            "<h2>Training</h2>" + _img(plot_training(logs, out / "training_loss.png"), "training loss")
        )
        rows = []
        for p in sorted(run_dir.glob("train-*/training.json")):
            t = json.loads(p.read_text())
            rows.append(
                [
                    t["method"],
                    t["steps"],
                    t["train_tokens"],
                    t["tokens_per_s"],
                    t["seconds"],
                    ", ".join(f"{x:.3f}" for x in t["stage_loss"]),
                    t.get("best_epoch"),
                    (t.get("test") or {}).get("accuracy", "-"),
                    (t.get("test_last") or {}).get("accuracy", "-"),
                ]
            )
        parts.append(
            _table(
                rows,
                [
                    "method",
                    "steps",
                    "tokens",
                    "tokens/s",
                    "seconds",
                    "loss per stage",
                    "best stage (dev)",
                    "test % (kept stage)",
                    "test % (last stage)",
                ],
            )
        )
    for p in sorted(run_dir.glob("train-*/test_predictions.jsonl")):
        parts.append(f"<h2>Example predictions: {html.escape(p.parent.name.removeprefix('train-'))}</h2>")
        parts.append(
            _predictions_html(_read_jsonl(p), getattr(getattr(config, "report", None), "predictions", 4))
        )
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        rows = [[name, s.get("seconds"), _step_note(s)] for name, s in manifest.get("stages", {}).items()]
        parts.append("<h2>Stages</h2>" + _table(rows, ["stage", "seconds", "this run"]))
        parts.append(
            f"<p>git commit {html.escape(str(manifest.get('git_commit')))}; versions "
            f"{html.escape(json.dumps(manifest.get('versions')))}</p>"
        )
    parts.append(
        "<h2>Config</h2><pre>" + html.escape(yaml.safe_dump(to_dict(config), sort_keys=False)) + "</pre>"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>KPOD report</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = run_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
