"""Tables for BENCHMARKS.md from the accuracy results (benchmarks/results/accuracy/*.json).

    .venv/bin/python benchmarks/report.py            # print, and rewrite BENCHMARKS.md's accuracy section

Per (suite, dataset, method): mean accuracy over seeds, the spread, each seed's accuracy with its
95 % interval, the share of answers never stated, tokens seen, tokens the loss covered and wall
time. Then kpod against std-cot on the same test questions: McNemar's exact test per seed pair
(same seed) and pooled over the pairs (discordant counts summed, which treats seed pairs as
independent replications), the paired gap with its 95 % interval over questions and seeds and
what it says about the +2-point target (met, ruled out, or not yet decided), also for the last
epoch's models, and the gap that pooled test can detect (power); whether each ablation
lies between std-cot and kpod (the issue's target); where a paper baseline ran, the order of the
paper's Table 1 methods here beside the paper's; every method paired with std-cot and kpod
paired with every other method (ablations, baselines), each as a pooled McNemar test and a paired
gap with its interval; the dev accuracy after each epoch and the epoch
kept (model selection); accuracy by the number of steps of the reference solution where the
results record it (else by the number of quantities written in the question, a proxy that needs
the test file named in the results' config), pooled over seeds, and each comparison's paired gap
by the number of steps; the out-of-distribution set where
a suite has one; the token weights' contrast of each weighted run. ``results/accuracy.png``:
every seed's accuracy with its 95 % interval beside the mean's bar, one panel per (suite, dataset).
The section of BENCHMARKS.md between the markers ``<!-- accuracy:begin -->`` and
``<!-- accuracy:end -->`` is replaced.
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
ABLATIONS = ("kpod-no-weights", "kpod-no-progressive", "kpod-no-diversity", "kpod-uniform-difficulty")
ORDER = [
    "untrained",
    "answer-only",
    "step-by-step",
    "std-cot",
    "scotd",
    "mcc-kd",
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
# Table 1 of the paper, LLaMA-7B, the methods this repository implements: the ordering to read ours
# against (std-cot is not in the paper's table).
PAPER_TABLE1 = {
    "gsm8k": {"scotd": 38.54, "mcc-kd": 41.58, "kpod": 46.74},
    "asdiv": {"scotd": 63.38, "mcc-kd": 65.76, "kpod": 71.02},
}


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / "accuracy").glob("*.json"))]


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> tuple[int, int, float]:
    from kpod.stats import discordant, mcnemar_exact

    only_a, only_b, _ = discordant(a, b)
    return only_a, only_b, mcnemar_exact(only_a, only_b)


def pooled_mcnemar(pairs: list[tuple[dict, dict]]) -> tuple[int, int, float]:
    """McNemar's exact test pooled over seed pairs: the questions only A and only B solved, summed
    over the pairs (each seed pair an independent replication), and the p-value of those sums."""
    from kpod.stats import mcnemar_exact

    counts = [mcnemar(a, b)[:2] for a, b in pairs]
    only_a, only_b = sum(n for n, _ in counts), sum(n for _, n in counts)
    return only_a, only_b, mcnemar_exact(only_a, only_b)


def _p(p: float) -> str:
    """A p-value for the per-seed tables: three decimals, or "< 0.001" (which three decimals
    would print as 0.000)."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _paired(name: str, runs: list[dict], baseline: list[dict]) -> list[str]:
    """McNemar's exact test of ``name`` against std-cot per shared seed and pooled, and the mean gap."""
    ours = {r["seed"]: r for r in runs}
    std = {r["seed"]: r for r in baseline}
    pairs = sorted(set(ours) & set(std))
    questions = [(ours[s]["per_question"], std[s]["per_question"]) for s in pairs]
    out = [f"\n{name} against std-cot on the same questions (McNemar, exact, two-sided):\n"]
    out.append(f"| seed | {name} right, std-cot wrong | std-cot right, {name} wrong | p |")
    out.append("|---|---|---|---|")
    for s, (a, b) in zip(pairs, questions, strict=True):
        only_a, only_b, p = mcnemar(a, b)
        out.append(f"| {s} | {only_a} | {only_b} | {_p(p)} |")
    pooled_a, pooled_b, pooled_p = pooled_mcnemar(questions)
    if len(pairs) > 1:
        out.append(f"| pooled | {pooled_a} | {pooled_b} | {_p(pooled_p)} |")
    gap = _mean(runs) - _mean(baseline)
    out.append(f"\nMean gap {name} - std-cot: **{gap:+.2f} points** (target: >= +2).")
    if pairs:
        out.append(gap_verdict(questions))
        last = [(ours[s].get("last_epoch"), std[s].get("last_epoch")) for s in pairs]
        if all(a and b and set(a["per_question"]) & set(b["per_question"]) for a, b in last):
            last_pairs = [(a["per_question"], b["per_question"]) for a, b in last]
            out.append("Last epoch's models (no selection): " + gap_verdict(last_pairs))
    if pairs and pooled_a + pooled_b:
        out.append(_power(pooled_a + pooled_b, [len(ours[s]["per_question"]) for s in pairs]))
    return out


def gap_verdict(pairs: list[tuple[dict, dict]], target: float = 2.0) -> str:
    """The paired gap with its 95 % interval over questions and seeds
    (:func:`kpod.stats.paired_gap_interval`), and what it says about the issue's target: a gap of
    at least ``target`` points with the pooled McNemar p < 0.05 (met; said with a caveat where the
    interval, which also resamples the seeds, still reaches 0), an interval below ``target``
    (a null with power: the method does not add ``target`` points here), or neither (not enough
    seed pairs)."""
    from kpod.stats import paired_gap_interval

    pooled_p = pooled_mcnemar(pairs)[2]
    gap, low, high = (100 * v for v in paired_gap_interval(pairs))
    over = "questions only (one seed pair)" if len(pairs) == 1 else f"questions and {len(pairs)} seed pairs"
    if gap >= target and pooled_p < 0.05:
        verdict = f"target met (>= +{target:g} points, pooled p = {pooled_p:.3g})"
        if low <= 0:  # the pooled test counts every seed's questions as independent draws
            verdict += (
                ", though the interval over seeds includes 0: the seeds disagree more than the pooled"
                " test allows for"
            )
    elif high < target:
        verdict = f"the interval excludes +{target:g}: a gap of {target:g} points is ruled out at this power"
    else:
        verdict = f"inconclusive: the interval includes +{target:g} (pooled p = {pooled_p:.3g})"
    interval = f"95 % interval [{low:+.2f}, {high:+.2f}] (bootstrap over {over})"
    return f"Paired gap {gap:+.2f} points, {interval}: {verdict}."


def _power(discordant: int, sizes: list[int]) -> str:
    """What the pooled McNemar test can detect at the observed discordance: the gap it finds with
    80 % power from these seed pairs, and how many pairs a 2-point gap needs (normal approximation,
    :func:`kpod.evaluate.mcnemar_detectable_gap`)."""
    from kpod.stats import mcnemar_detectable_gap, mcnemar_pairs_needed

    n = statistics.fmean(sizes)
    share = discordant / sum(sizes)
    detectable = 100 * mcnemar_detectable_gap(share, sum(sizes))
    needed = mcnemar_pairs_needed(0.02, share, round(n))
    return (
        f"Power: {100 * share:.1f} % of the questions are solved by only one of the two (pooled); at that "
        f"discordance the pooled test detects a gap of {detectable:.1f} points with 80 % power from "
        f"{len(sizes)} seed pair(s) of {n:.0f} questions; a 2-point gap needs {needed} seed pairs."
    )


def _mean(runs: list[dict]) -> float:
    return statistics.fmean(r["accuracy"] for r in runs)


def _unstated(runs: list[dict]) -> str:
    """Mean share of test answers the student never stated (found only as the text's last number,
    or not at all): mostly generations that ran to the token limit. '-' for results without
    ``answer_rules``."""
    shares = [
        100 * (r["answer_rules"].get("last", 0) + r["answer_rules"].get("none", 0)) / r["n"]
        for r in runs
        if "answer_rules" in r
    ]
    return f"{statistics.fmean(shares):.1f}" if shares else "-"


def _loss_tokens(runs: list[dict]) -> str:
    """Mean number of target tokens the loss covered (``target_tokens``): a progressive method sees the
    same sequences as std-cot ("tokens seen") but, while earlier steps are given as input, computes
    its loss on fewer of them. "-" for results that predate the key."""
    counts = [r["target_tokens"] for r in runs if "target_tokens" in r]
    return f"{statistics.fmean(counts):,.0f}" if len(counts) == len(runs) and runs else "-"


QUANTITY_BINS = ("1-2", "3", "4+")


def quantity_bin(question: str) -> str:
    """Which of :data:`QUANTITY_BINS` a question falls in by the numbers written in it (``2``, ``1,000``,
    ``3.5``; number words such as "twice" are not counted): a proxy for the number of steps its
    solution takes, available for every test set (ASDiv's test questions come without rationales)."""
    from kpod.data.answers import find_numbers

    n = len(find_numbers(question))
    return "1-2" if n <= 2 else "3" if n == 3 else "4+"


def by_quantities(runs: list[dict], questions: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(right, scored) per quantity bin, pooled over the runs (seeds); questions missing from
    ``questions`` are left out."""
    counts = {b: [0, 0] for b in QUANTITY_BINS}
    for r in runs:
        for qid, right in r["per_question"].items():
            if qid in questions:
                cell = counts[quantity_bin(questions[qid])]
                cell[0] += bool(right)
                cell[1] += 1
    return {b: (c[0], c[1]) for b, c in counts.items()}


def _quantities(
    methods: dict[str, list[dict]], names: list[str], questions: dict[str, str] | None
) -> list[str]:
    if not questions:
        return []
    n_questions = {b: 0 for b in QUANTITY_BINS}
    for qid in next(iter(methods.values()))[0]["per_question"]:
        if qid in questions:
            n_questions[quantity_bin(questions[qid])] += 1
    head = " | ".join(f"{b} quantities ({n_questions[b]} q)" for b in QUANTITY_BINS)
    out = [
        "\nAccuracy % by the number of quantities written in the question (a proxy for its steps), "
        "right / scored pooled over seeds:\n",
        f"| method | {head} |",
        "|---|" + "---|" * len(QUANTITY_BINS),
    ]
    for m in names:
        cells = by_quantities(methods[m], questions)
        out.append(
            f"| {m} | "
            + " | ".join(f"{100 * r / n:.1f} ({r}/{n})" if n else "-" for r, n in cells.values())
            + " |"
        )
    return out


def reference_steps(run: dict) -> dict[str, int]:
    """qid -> number of steps of the test question's reference solution (the result's own
    ``questions``), for the questions that have one: ASDiv's test set has answers only, recorded
    as 0 steps, and says nothing about steps."""
    return {q: v["steps"] for q, v in (run.get("questions") or {}).items() if v.get("steps")}


def by_steps(runs: list[dict]) -> dict[int, tuple[int, int]]:
    """(right, scored) per number of solution steps of the test question (:func:`reference_steps`),
    pooled over the runs (seeds)."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in runs:
        info = reference_steps(r)
        for qid, right in r["per_question"].items():
            if qid in info:
                cell = counts[info[qid]]
                cell[0] += bool(right)
                cell[1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(counts.items())}


def _steps(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """Accuracy by the number of steps of the reference solution (suites whose results record it)."""
    if not all(reference_steps(r) for m in names for r in methods[m]):
        return []
    sizes = by_steps([next(iter(methods.values()))[0]])  # (right, scored) of one run: scored = size
    steps = list(sizes)
    out = [
        "\nAccuracy % by the number of steps in the reference solution, right / scored pooled over seeds:\n",
        "| method | " + " | ".join(f"{k} steps ({sizes[k][1]} q)" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for m in names:
        cells = by_steps(methods[m])
        out.append(
            f"| {m} | "
            + " | ".join(
                f"{100 * cells[k][0] / cells[k][1]:.1f} ({cells[k][0]}/{cells[k][1]})" if k in cells else "-"
                for k in steps
            )
            + " |"
        )
    return out


def _steps_paired(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """Each comparison (:func:`comparisons`) within each number of solution steps: the paired gap
    with its 95 % interval on the questions of that many steps, over the seeds both methods ran.
    The in-rationale curriculum withholds more of a longer rationale, so where it costs or helps
    should show by length."""
    from kpod.stats import paired_gap_interval

    if not all(reference_steps(r) for m in names for r in methods[m]):
        return []
    info = reference_steps(next(iter(methods.values()))[0])
    steps = sorted(set(info.values()))
    rows = []
    for a, b in comparisons(names):
        seeds, pairs = seed_pairs(methods, a, b)
        if not seeds:
            continue
        cells = []
        for k in steps:
            keep = {q for q, v in info.items() if v == k}
            subset = [({q: x[q] for q in keep & set(x)}, {q: y[q] for q in keep & set(y)}) for x, y in pairs]
            gap, low, high = (100 * v for v in paired_gap_interval(subset))
            cells.append(f"{gap:+.1f} [{low:+.1f}, {high:+.1f}]")
        rows.append(f"| {a} - {b} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    counts = {k: sum(v == k for v in info.values()) for k in steps}
    return [
        "\nPaired gap in points by the number of steps in the reference solution, with its 95 % interval "
        "(over questions and the seeds both ran):\n",
        "| A - B | seeds | " + " | ".join(f"{k} steps ({counts[k]} q)" for k in steps) + " |",
        "|---|---|" + "---|" * len(steps),
        *rows,
    ]


def _ood(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """The kept models on the out-of-distribution set (templates never trained on), and kpod against
    std-cot there."""
    rows = [m for m in names if all(r.get("ood") for r in methods[m])]
    if not rows:
        return []
    first = methods[rows[0]][0]["ood"]
    out = [
        f"\nOut of distribution: {first['n']} problems of {len(first['templates'])} templates never "
        "trained on "
        f"({', '.join(first['templates'])}), scored with the kept model:\n",
        "| method | seeds | mean accuracy % | per seed (95 % CI) |",
        "|---|---|---|---|",
    ]
    for m in rows:
        runs = methods[m]
        per_seed = "; ".join(
            f"s{r['seed']}: {r['ood']['accuracy']:.2f} [{r['ood']['ci95'][0]:.1f}, {r['ood']['ci95'][1]:.1f}]"
            for r in runs
        )
        mean = statistics.fmean(r["ood"]["accuracy"] for r in runs)
        out.append(f"| {m} | {len(runs)} | {mean:.2f} | {per_seed} |")
    if "kpod" in rows and "std-cot" in rows:
        ours = {r["seed"]: r["ood"]["per_question"] for r in methods["kpod"]}
        std = {r["seed"]: r["ood"]["per_question"] for r in methods["std-cot"]}
        pairs = [(ours[s], std[s]) for s in sorted(set(ours) & set(std))]
        if pairs:
            out.append(f"\nkpod - std-cot out of distribution: {gap_verdict(pairs)}")
    return out


def _weights(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """The token weights each weighted run trained with: contrast (mean weight of digit/operator
    tokens minus that of the 50 most frequent words; keypoints minus the rest on synthetic data)
    and the mean weight (kept ratio), from the run's weights step."""
    rows = [(m, r) for m in names for r in methods[m] if r.get("weights")]
    if not rows:
        return []
    out = ["\nToken weights of each weighted run (the weights step's own metrics):\n"]
    out += ["| method | seed | contrast | mean weight | min | max |", "|---|---|---|---|---|---|"]
    for m, r in rows:
        cells = (r["weights"].get(k) for k in ("contrast", "kept_ratio", "w_min", "w_max"))
        out.append(
            f"| {m} | {r['seed']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |"
        )
    return out


def test_questions(results: list[dict]) -> dict[tuple[str, str], dict[str, str]]:
    """qid -> question of each (suite, dataset)'s test file, read from the path in its results' config
    with kpod's loader; a (suite, dataset) whose file is not on this machine is left out."""
    from kpod.data.loaders import load_examples

    out: dict[tuple[str, str], dict[str, str]] = {}
    for r in results:
        key = (r["suite"], r["dataset"])
        path = ((r.get("config") or {}).get("data") or {}).get("test_path")
        if key in out or not path or not Path(path).is_file():
            continue
        examples, _ = load_examples(path, None)
        out[key] = {e.qid: e.question for e in examples}
    return out


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """The pairs (A, B) the report compares on the same questions: every trained method against
    std-cot, then kpod against every other trained method (its ablations and the baselines), so
    that an ablation's cost or a baseline's standing reads as a paired gap with its interval."""
    trained = [m for m in names if m not in ("untrained", "std-cot")]
    against_std = [(m, "std-cot") for m in trained] if "std-cot" in names else []
    against_kpod = [("kpod", m) for m in trained if m != "kpod"] if "kpod" in names else []
    return against_std + against_kpod


def seed_pairs(methods: dict[str, list[dict]], a: str, b: str) -> tuple[list[int], list[tuple[dict, dict]]]:
    """The seeds both ``a`` and ``b`` ran, and each seed's (a's, b's) per-question correctness."""
    ours = {r["seed"]: r["per_question"] for r in methods[a]}
    theirs = {r["seed"]: r["per_question"] for r in methods[b]}
    seeds = sorted(set(ours) & set(theirs))
    return seeds, [(ours[s], theirs[s]) for s in seeds]


def _comparisons(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """One row per comparison (:func:`comparisons`) over the seeds both methods ran: the questions
    only A or only B solved, pooled over those seed pairs, the pooled exact McNemar p, and the
    paired gap A - B with its 95 % interval over questions and seed pairs
    (:func:`kpod.stats.paired_gap_interval`)."""
    from kpod.stats import paired_gap_interval

    rows = []
    for a, b in comparisons(names):
        seeds, pairs = seed_pairs(methods, a, b)
        if not seeds:
            continue
        only_a, only_b, p = pooled_mcnemar(pairs)
        gap, low, high = (100 * v for v in paired_gap_interval(pairs))
        rows.append(
            f"| {a} - {b} | {', '.join(map(str, seeds))} | {only_a} | {only_b} | "
            f"{p:.3g} | **{gap:+.2f}** [{low:+.2f}, {high:+.2f}] |"
        )
    if not rows:
        return []
    return [
        "\nEvery comparison on the same questions, over the seeds both ran (paired gap in points with its "
        "95 % bootstrap interval over questions and seed pairs; McNemar exact, pooled over the pairs):\n",
        "| A - B | seeds | A right, B wrong | B right, A wrong | pooled p | paired gap [95 % interval] |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _ablations(methods: dict[str, list[dict]]) -> list[str]:
    """Target: each ablation's mean lies between std-cot's and kpod's (the paper's ordering)."""
    if "std-cot" not in methods or "kpod" not in methods:
        return []
    lo, hi = _mean(methods["std-cot"]), _mean(methods["kpod"])
    out = []
    for name in ABLATIONS:
        if name in methods:
            a = _mean(methods[name])
            between = min(lo, hi) <= a <= max(lo, hi)
            where = "between" if between else ("below" if a < min(lo, hi) else "above")
            out.append(
                f"{name}: {a:.2f} %, {where} std-cot ({lo:.2f}) and kpod ({hi:.2f})"
                f"{'' if between else ' (target: between)'}."
            )
    return ["", *out] if out else []


def _ordering(methods: dict[str, list[dict]], dataset: str) -> list[str]:
    """The paper's Table 1 methods that ran here, ordered by mean accuracy over their seeds, beside
    the paper's order of the same methods (LLaMA-7B). Only where a baseline (scotd, mcc-kd) ran:
    the ordering is what the paper's table claims, the paired rows below say how sure each step is.
    Equal means (to two decimals) read "=", not ">". While the methods have run different numbers of
    seeds (a suite half done), each mean says over how many: a one-seed mean beside a three-seed one
    is a weaker reading."""
    paper = PAPER_TABLE1.get(dataset, {})
    ours = [m for m in paper if m in methods]
    with_std = ours + (["std-cot"] if "std-cot" in methods else [])
    if not set(ours) - {"kpod"} or len(with_std) < 2:
        return []
    here = sorted(with_std, key=lambda m: -_mean(methods[m]))
    theirs = sorted(ours, key=lambda m: -paper[m])
    same = [m for m in here if m in paper] == theirs
    means = [f"{_mean(methods[m]):.2f}" for m in here]
    seeds = [len(methods[m]) for m in here]
    counted = [
        f"{m} {a}" + (f" ({n} seed{'s' if n > 1 else ''})" if len(set(seeds)) > 1 else "")
        for m, a, n in zip(here, means, seeds, strict=True)
    ]
    ranked = counted[0]
    for i in range(1, len(here)):
        ranked += f" {'=' if means[i] == means[i - 1] else '>'} {counted[i]}"
    return [
        "",
        f"Table 1's ordering: here {ranked}; the paper (LLaMA-7B) "
        + " > ".join(f"{m} {paper[m]}" for m in theirs)
        + (" (the same order of its methods)." if same else " (a different order of its methods)."),
    ]


def _selection(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """Dev accuracy after each epoch for every trained run, the epoch whose checkpoint was kept
    (the best eligible epoch; runs before issue #20 kept the first of equal ones, later ones the
    later) in bold, beside the test accuracy it gave. Epochs not scored on dev show "-"."""
    rows = [(m, r) for m in names for r in methods[m] if r.get("dev")]
    if not rows:
        return []
    epochs = max(d["epoch"] for _, r in rows for d in r["dev"]) + 1
    out = [
        "",
        "Model selection: dev accuracy % after each epoch (the kept checkpoint in bold), the test "
        "accuracy of the kept one and of the last epoch's model (runs since `test_last_epoch`):",
        "",
        "| method | seed | "
        + " | ".join(f"epoch {e}" for e in range(epochs))
        + " | test | test, last epoch |",
        "|---|---|" + "---|" * epochs + "---|---|",
    ]
    for m, r in rows:
        cells = {d["epoch"]: f"{d['accuracy']:.1f}" for d in r["dev"]}
        best = r.get("best_epoch")
        if best in cells:
            cells[best] = f"**{cells[best]}**"
        dev = " | ".join(cells.get(e, "-") for e in range(epochs))
        last = f"{r['last_epoch']['accuracy']:.2f}" if r.get("last_epoch") else "-"
        out.append(f"| {m} | {r['seed']} | {dev} | {r['accuracy']:.2f} | {last} |")
    pair = [methods.get("std-cot", []), methods.get("kpod", [])]
    if all(runs and all(r.get("last_epoch") for r in runs) for runs in pair):
        std, kpod = (statistics.fmean(r["last_epoch"]["accuracy"] for r in runs) for runs in pair)
        out.append(
            f"\nWithout selection (every run's last epoch): kpod {kpod:.2f}, std-cot {std:.2f}, "
            f"gap **{kpod - std:+.2f} points**."
        )
    return out


def group(results: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(suite, dataset) -> method (with ``+variant`` when tagged) -> its runs, seeds ascending."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        variant = f"+{r['variant']}" if r.get("variant") else ""
        groups[(r["suite"], r["dataset"])][r["method"] + variant].append(r)
    for methods in groups.values():
        for runs in methods.values():
            runs.sort(key=lambda r: r["seed"])
    return groups


def _names(methods: dict[str, list[dict]]) -> list[str]:
    """Methods in ORDER (untrained first, kpod last), each variant after its method."""

    def key(name: str) -> tuple[int, str]:
        base = name.split("+")[0]
        return (ORDER.index(base) if base in ORDER else len(ORDER), name)

    return sorted(methods, key=key)


def seed_points(runs: list[dict], x: float, spread: float = 0.5) -> list[tuple[float, float, float, float]]:
    """(x, accuracy, CI low, CI high) of each seed of one method, side by side around ``x`` within
    ``spread``, in seed order, so that the intervals of several seeds do not hide each other."""
    runs = sorted(runs, key=lambda r: r["seed"])
    step = spread / len(runs)
    left = x - spread / 2
    return [(left + step * (i + 0.5), r["accuracy"], r["ci95"][0], r["ci95"][1]) for i, r in enumerate(runs)]


def plot(results: list[dict], path: Path) -> Path:
    """One panel per (suite, dataset): mean accuracy per method as a bar, each seed as a dot with its
    95 % interval (Wilson), so a reader sees at a glance whether two methods' gap exceeds the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpod.report import method_colour

    groups = group(results)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False, constrained_layout=True
    )
    for ax, ((suite, dataset), methods) in zip(axes[0], sorted(groups.items()), strict=True):
        names = _names(methods)
        means = [_mean(methods[m]) for m in names]
        ax.bar(range(len(names)), means, color=[method_colour(m) for m in names], alpha=0.55)
        top = max(r["ci95"][1] for runs in methods.values() for r in runs) or 1.0
        ax.set_ylim(0, top * 1.12)
        for i, m in enumerate(names):
            points = seed_points(methods[m], i)
            xs, accs, lows, highs = (list(v) for v in zip(*points, strict=True))
            below = [a - lo for a, lo in zip(accs, lows, strict=True)]
            above = [h - a for a, h in zip(accs, highs, strict=True)]
            ax.errorbar(
                xs, accs, yerr=[below, above], fmt="o", color="black", ms=4, elinewidth=0.8, capsize=2
            )
            ax.text(i, max(highs) + 0.02 * top, f"{means[i]:.1f}", ha="center", va="bottom", fontsize="small")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        n = methods[names[0]][0]["n"]
        ax.set_title(f"{suite} / {dataset} (n = {n})")
        ax.set_ylabel("accuracy % (bar: mean; dots: seeds, 95 % CI)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _arithmetic(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """The equations of numbers only written in the test generations (results with
    ``arithmetic``) and the share whose result is wrong: KPOD's weights favour numbers and
    operators, so this is where they should show, whatever the final answers do."""
    rows = [m for m in names if all(r.get("arithmetic") for r in methods[m])]
    if not rows:
        return []
    out = [
        "\nWritten arithmetic: equations of numbers only in the test generations (`a op b = c`, checked"
        " exactly, a result rounded to the decimals written counting as right), pooled over seeds:\n",
        "| method | seeds | equations per question | wrong % | wrong % per seed "
        "| questions with a wrong one % |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        cells = [r["arithmetic"] for r in methods[m]]
        written, wrong = sum(c["equations"] for c in cells), sum(c["wrong"] for c in cells)
        questions = sum(c["questions"] for c in cells)
        slipped = sum(c["questions_with_slip"] for c in cells)
        per_seed = "; ".join(
            f"s{r['seed']}: {100 * c['wrong'] / c['equations']:.1f}" if c["equations"] else f"s{r['seed']}: -"
            for r, c in zip(methods[m], cells, strict=True)
        )
        share = f"{100 * wrong / written:.1f}" if written else "-"
        out.append(
            f"| {m} | {len(cells)} | {written / questions:.2f} | {share} | {per_seed} | "
            f"{100 * slipped / questions:.1f} |"
        )
    return out


DEPARTURES = ("first", "middle", "last", "none")


def departures(runs: list[dict]) -> dict[str, int]:
    """Questions by where the generation first departs from the reference (the runs'
    ``first_missing_step``, positioned by :func:`reference_steps`; questions without a reference
    solution are left out): at its first step, a middle one, its last one, or none (every step's
    result written), pooled over the runs."""

    def place(index: int | None, steps: int) -> str:
        if index is None:
            return "none"
        if index == 0:
            return "first"
        return "last" if index == steps - 1 else "middle"

    counts = dict.fromkeys(DEPARTURES, 0)
    for r in runs:
        steps = reference_steps(r)
        for qid, index in r["first_missing_step"].items():
            if qid in steps:
                counts[place(index, steps[qid])] += 1
    return counts


def _departures(methods: dict[str, list[dict]], names: list[str]) -> list[str]:
    """Where each method's generations first leave the reference solution: the in-rationale
    curriculum trains the last steps longest, so its students should depart earlier, if anywhere."""
    rows = [m for m in names if all(r.get("first_missing_step") and reference_steps(r) for r in methods[m])]
    if not rows:
        return []
    out = [
        "\nWhere the generations first depart from the reference solution: the first reference step whose"
        " result (its last number) the generation never writes, % of questions pooled over seeds:\n",
        "| method | seeds | first step | a middle step | last step | none (every result written) |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        counts = departures(methods[m])
        total = sum(counts.values())
        out.append(
            f"| {m} | {len(methods[m])} | "
            + " | ".join(f"{100 * counts[k] / total:.1f} ({counts[k]})" for k in DEPARTURES)
            + " |"
        )
    return out


def tables(results: list[dict], questions: dict[tuple[str, str], dict[str, str]] | None = None) -> str:
    groups = group(results)
    questions = questions or {}
    out = []
    for (suite, dataset), methods in sorted(groups.items()):
        out.append(f"#### {suite} / {dataset}\n")
        out.append(
            "| method | seeds | mean accuracy % | sd | per seed (95 % CI) | no stated answer % "
            "| tokens seen | loss tokens | wall (min) | commit |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        names = _names(methods)
        for m in names:
            runs = methods[m]
            accs = [r["accuracy"] for r in runs]
            sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
            per_seed = "; ".join(
                f"s{r['seed']}: {r['accuracy']:.2f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" for r in runs
            )
            tokens = statistics.fmean(r["train_tokens"] for r in runs)
            targets = _loss_tokens(runs)
            wall = statistics.fmean(r["wall_seconds"] for r in runs) / 60
            commits = ", ".join(sorted({r["commit"] for r in runs}))
            out.append(
                f"| {m} | {len(runs)} | **{statistics.fmean(accs):.2f}** | {sd} | {per_seed} | "
                f"{_unstated(runs)} | {tokens:,.0f} | {targets} | {wall:.0f} | {commits} |"
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
        out.extend(_ablations(methods))
        out.extend(_ordering(methods, dataset))
        out.extend(_comparisons(methods, names))
        out.extend(_selection(methods, names))
        # By solution steps where the results record them, else by the quantities proxy.
        out.extend(_steps(methods, names) or _quantities(methods, names, questions.get((suite, dataset))))
        out.extend(_steps_paired(methods, names))
        out.extend(_ood(methods, names))
        out.extend(_arithmetic(methods, names))
        out.extend(_departures(methods, names))
        out.extend(_weights(methods, names))
        out.append("")
    return "\n".join(out)


def main() -> None:
    results = load_results()
    text = tables(results, test_questions(results)) if results else "No accuracy results yet.\n"
    if results:
        figure = plot(results, RESULTS / "accuracy.png")
        text = f"![accuracy per method and seed]({figure.relative_to(ROOT).as_posix()})\n\n{text}"
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
