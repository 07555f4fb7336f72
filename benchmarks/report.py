"""Tables for BENCHMARKS.md from the accuracy results (benchmarks/results/accuracy/*.json).

    .venv/bin/python benchmarks/report.py            # print, and rewrite BENCHMARKS.md's accuracy section

Per (suite, dataset, method): mean accuracy over seeds, the spread, each seed's accuracy with its
95 % interval, tokens seen and wall time; then kpod against std-cot on the same test questions:
McNemar's exact test per seed pair (same seed) and pooled over the pairs (discordant counts
summed, which treats seed pairs as independent replications). The section of BENCHMARKS.md
between the markers ``<!-- accuracy:begin -->`` and ``<!-- accuracy:end -->`` is replaced.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT  # noqa: E402

BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
ORDER = [
    "untrained",
    "answer-only",
    "step-by-step",
    "std-cot",
    "kpod-no-weights",
    "kpod-no-progressive",
    "kpod-no-diversity",
    "kpod-uniform-difficulty",
    "kpod",
]
PAPER = {  # Table 1 / 2 of the paper, LLaMA-7B, for context only (a 50x larger student, gpt-3.5 rationales)
    ("gsm8k", "kpod"): 46.74,
    ("asdiv", "kpod"): 71.02,
    ("gsm8k", "best baseline"): 41.58,
    ("asdiv", "best baseline"): 65.76,
    ("gsm8k", "kpod-no-weights"): 42.64,
    ("gsm8k", "kpod-no-progressive"): 43.25,
}


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / "accuracy").glob("*.json"))]


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> tuple[int, int, float]:
    from kpod.evaluate import mcnemar_exact

    common = sorted(set(a) & set(b))
    only_a = sum(a[q] and not b[q] for q in common)
    only_b = sum(b[q] and not a[q] for q in common)
    return only_a, only_b, mcnemar_exact(only_a, only_b)


def _paired(name: str, runs: list[dict], baseline: list[dict]) -> list[str]:
    """McNemar's exact test of ``name`` against std-cot per shared seed and pooled, and the mean gap."""
    from kpod.evaluate import mcnemar_exact

    ours = {r["seed"]: r for r in runs}
    std = {r["seed"]: r for r in baseline}
    pairs = sorted(set(ours) & set(std))
    out = [f"\n{name} against std-cot on the same questions (McNemar, exact, two-sided):\n"]
    out.append(f"| seed | {name} right, std-cot wrong | std-cot right, {name} wrong | p |")
    out.append("|---|---|---|---|")
    tot_b = tot_c = 0
    for s in pairs:
        b, c, p = mcnemar(ours[s]["per_question"], std[s]["per_question"])
        tot_b, tot_c = tot_b + b, tot_c + c
        out.append(f"| {s} | {b} | {c} | {p:.3f} |")
    if len(pairs) > 1:
        out.append(f"| pooled | {tot_b} | {tot_c} | {mcnemar_exact(tot_b, tot_c):.3f} |")
    gap = statistics.fmean(r["accuracy"] for r in runs) - statistics.fmean(r["accuracy"] for r in baseline)
    out.append(f"\nMean gap {name} - std-cot: **{gap:+.2f} points** (target: >= +2).")
    return out


def tables(results: list[dict]) -> str:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        variant = f"+{r['variant']}" if r.get("variant") else ""
        groups[(r["suite"], r["dataset"])][r["method"] + variant].append(r)
    out = []
    for (suite, dataset), methods in sorted(groups.items()):
        out.append(f"#### {suite} / {dataset}\n")
        out.append(
            "| method | seeds | mean accuracy % | sd | per seed (95 % CI) | tokens seen | wall (min) "
            "| commit |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        names = sorted(methods, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
        for m in names:
            runs = sorted(methods[m], key=lambda r: r["seed"])
            accs = [r["accuracy"] for r in runs]
            sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
            per_seed = "; ".join(
                f"s{r['seed']}: {r['accuracy']:.2f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" for r in runs
            )
            tokens = statistics.fmean(r["train_tokens"] for r in runs)
            wall = statistics.fmean(r["wall_seconds"] for r in runs) / 60
            commits = ", ".join(sorted({r["commit"] for r in runs}))
            out.append(
                f"| {m} | {len(runs)} | **{statistics.fmean(accs):.2f}** | {sd} | {per_seed} | "
                f"{tokens:,.0f} | {wall:.0f} | {commits} |"
            )
        n = runs[0]["n"] if names else 0
        out.append(f"\nn = {n} test questions.")
        paper = {k[1]: v for k, v in PAPER.items() if k[0] == dataset}
        if paper:
            out.append(
                "Paper (LLaMA-7B, for context): " + ", ".join(f"{k} {v}" for k, v in paper.items()) + "."
            )
        contenders = [m for m in names if m == "kpod" or m.startswith("kpod+")]
        for name in contenders if "std-cot" in methods else []:
            out.extend(_paired(name, methods[name], methods["std-cot"]))
        out.append("")
    return "\n".join(out)


def main() -> None:
    results = load_results()
    text = tables(results) if results else "No accuracy results yet.\n"
    print(text)
    bench = ROOT / "BENCHMARKS.md"
    doc = bench.read_text(encoding="utf-8")
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        generated = "(generated by `benchmarks/report.py` from `benchmarks/results/accuracy/`)\n\n"
        bench.write_text(f"{head}{BEGIN}\n{generated}{text}\n{END}{tail}", encoding="utf-8")
        print(f"updated {bench}")


if __name__ == "__main__":
    main()
