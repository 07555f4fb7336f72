"""benchmarks/report.py: the accuracy tables, paired tests and figure that BENCHMARKS.md is built from."""

from __future__ import annotations

import json

import pytest

from kpod.stats import mcnemar_exact


@pytest.fixture(scope="module")
def report(load_benchmark):
    return load_benchmark("report")


def _result(method: str, seed: int, right: set[int], n: int = 10, dataset: str = "asdiv", variant: str = ""):
    return {
        "suite": "cpu-small",
        "dataset": dataset,
        "method": method,
        "variant": variant,
        "seed": seed,
        "accuracy": 100 * len(right) / n,
        "ci95": [0.0, 100.0],
        "n": n,
        "train_tokens": 1000,
        "wall_seconds": 600,
        "commit": "abc1234",
        "per_question": {f"q{i}": i in right for i in range(n)},
    }


def test_paired_counts_per_seed_and_pooled(report):
    results = [
        _result("std-cot", 0, {0, 1, 2}),
        _result("kpod", 0, {0, 1, 3, 4, 5}),  # kpod only: 3, 4, 5; std-cot only: 2
        _result("std-cot", 1, {0, 6, 7}),
        _result("kpod", 1, {0, 6, 8}),  # kpod only: 8; std-cot only: 7
    ]
    text = report.tables(results)
    assert "| 0 | 3 | 1 |" in text
    assert "| 1 | 1 | 1 |" in text
    assert f"| pooled | 4 | 2 | {mcnemar_exact(4, 2):.3f} |" in text
    # means 40.0 (kpod) and 30.0 (std-cot)
    assert "Mean gap kpod - std-cot: **+10.00 points**" in text
    # 6 of 20 paired questions discordant: 2.8016 * sqrt(0.3 / 20) = 34.3 points detectable;
    # 2 points need (2.8016 * sqrt(0.3 / 10) / 0.02)^2 = 588.8 -> 589 pairs of 10 questions
    assert "30.0 % of the questions are solved by only one" in text
    assert "detects a gap of 34.3 points with 80 % power from 2 seed pair(s) of 10 questions" in text
    assert "a 2-point gap needs 589 seed pairs" in text
    # A pooled p below 0.001 reads as such, not as 0.000: 12 questions to kpod, none to std-cot.
    lopsided = [_result("std-cot", 0, set(), n=12), _result("kpod", 0, set(range(12)), n=12)]
    lopsided += [_result("std-cot", 1, set(), n=12), _result("kpod", 1, set(range(12)), n=12)]
    assert mcnemar_exact(24, 0) < 0.001
    assert "| pooled | 24 | 0 | < 0.001 |" in report.tables(lopsided)


def test_variants_get_their_own_row_and_paired_block(report):
    results = [
        _result("std-cot", 0, {0, 1}),
        _result("kpod", 0, {0, 1, 2}),
        _result("kpod", 0, {0}, variant="minmax"),
        _result("untrained", 0, set()),
    ]
    text = report.tables(results)
    rows = [
        line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "%" not in line
    ]
    order = [r for r in rows if r in {"untrained", "std-cot", "kpod", "kpod+minmax"}]
    assert order == ["untrained", "std-cot", "kpod", "kpod+minmax"]
    assert "kpod+minmax against std-cot" in text
    assert "Mean gap kpod+minmax - std-cot: **-10.00 points**" in text


def test_ablations_are_placed_against_std_cot_and_kpod(report):
    results = [
        _result("std-cot", 0, {0, 1}),
        _result("kpod", 0, {0, 1, 2, 3}),
        _result("kpod-no-weights", 0, {0, 1, 2}),
        _result("kpod-no-progressive", 0, {0}),
    ]
    text = report.tables(results)
    assert "kpod-no-weights: 30.00 %, between std-cot (20.00) and kpod (40.00)." in text
    assert "kpod-no-progressive: 10.00 %, below std-cot (20.00) and kpod (40.00) (target: between)." in text


def test_plot_has_one_panel_per_dataset(report, tmp_path):
    from PIL import Image

    results = [
        _result("std-cot", 0, {0}),
        _result("kpod", 0, {0, 1}),
        _result("kpod", 0, {1}, dataset="gsm8k"),
    ]
    one = report.plot(results[:2], tmp_path / "one.png")
    two = report.plot(results, tmp_path / "two.png")
    w1, w2 = Image.open(one).size[0], Image.open(two).size[0]
    assert w2 == pytest.approx(2 * w1, rel=0.02)


def test_table_shows_the_tokens_the_loss_covered(report):
    kpod = [_result("kpod", 0, {0}), _result("kpod", 1, {0})]
    kpod[0]["target_tokens"], kpod[1]["target_tokens"] = 700, 800
    std = [_result("std-cot", 0, {0})]  # a result written before the key existed
    rows = {line.split(" | ")[0]: line for line in report.tables(kpod + std).splitlines()}
    assert "| 1,000 | 750 |" in rows["| kpod"]
    assert "| 1,000 | - |" in rows["| std-cot"]


def test_quantity_bins_count_the_numbers_written_in_the_question(report):
    assert report.quantity_bin("Tom has 3 apples and buys twice as many. How many?") == "1-2"
    assert report.quantity_bin("He paid $1,000 for 3 chairs and 2.5 tables.") == "3"
    assert report.quantity_bin("2 cats, 3 dogs, 4 birds and 5 fish.") == "4+"


def test_accuracy_by_quantities_pools_the_seeds(report, tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=7\n#### 7"},
        {
            "question": "A has 2, B has 5, C has 1,000 and D has 3.5. Sum?",
            "answer": "2+5+1000+3.5=1010.5\n#### 1010.5",
        },
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for seed, right in (
        (0, {"mydata-test-0": True, "mydata-test-1": True}),
        (1, {"mydata-test-0": False, "mydata-test-1": True}),
    ):
        r = _result("kpod", seed, set(), n=2)
        r["per_question"] = {**right, "not-in-the-file": True}
        r["config"] = {"data": {"test_path": str(folder / "test.jsonl")}}
        runs.append(r)
    missing = _result("std-cot", 0, set(), dataset="gsm8k")
    missing["config"] = {"data": {"test_path": str(tmp_path / "elsewhere.jsonl")}}
    questions = report.test_questions(runs + [missing])
    assert set(questions) == {("cpu-small", "asdiv")}  # the missing file is skipped, not an error
    assert report.by_quantities(runs, questions["cpu-small", "asdiv"]) == {
        "1-2": (1, 2),
        "3": (0, 0),
        "4+": (2, 2),
    }
    text = report.tables(runs, questions)
    assert "| method | 1-2 quantities (1 q) | 3 quantities (0 q) | 4+ quantities (1 q) |" in text
    assert "| kpod | 50.0 (1/2) | - | 100.0 (2/2) |" in text
    assert "by the number of quantities" not in report.tables(runs)  # no questions, no table


def test_seed_points_spread_seeds_around_the_bar_with_their_intervals(report):
    runs = [_result("kpod", 2, {0, 1, 2}), _result("kpod", 0, {0}), _result("kpod", 1, {0, 1})]
    runs[0]["ci95"] = [10.0, 60.0]
    points = report.seed_points(runs, x=3.0, spread=0.6)
    # seed order, evenly spaced within the spread, centred on the bar
    assert [p[1] for p in points] == [10.0, 20.0, 30.0]
    assert [p[0] for p in points] == pytest.approx([2.8, 3.0, 3.2])
    assert points[2][2:] == (10.0, 60.0)
    (single,) = report.seed_points(runs[:1], x=1.0)
    assert single[0] == 1.0


def test_main_rewrites_only_the_marked_section(report, tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "results" / "accuracy").mkdir(parents=True)
    for r in (_result("std-cot", 0, {0}), _result("kpod", 0, {0, 1})):
        path = tmp_path / "benchmarks" / "results" / "accuracy" / f"{r['method']}-{r['seed']}.json"
        path.write_text(json.dumps(r))
    (tmp_path / "BENCHMARKS.md").write_text(f"before\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "RESULTS", tmp_path / "benchmarks" / "results")
    report.main()
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert doc.startswith("before\n") and doc.endswith(f"{report.END}\nafter\n")
    assert "old table" not in doc
    assert "![accuracy per method and seed](benchmarks/results/accuracy.png)" in doc
    assert (tmp_path / "benchmarks" / "results" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| kpod | 1 | **20.00** |" in doc


def test_share_of_answers_never_stated(report):
    stated = _result("kpod", 0, {0, 1})
    stated["answer_rules"] = {"template": 7, "last": 2, "none": 1}
    other = _result("kpod", 1, {0})
    other["answer_rules"] = {"template": 9, "last": 1}
    old = _result("std-cot", 0, {0})  # written before answer_rules existed
    lines = report.tables([stated, other, old]).splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| method")).split("|")]
    column = header.index("no stated answer %")

    def cell(method: str) -> str:
        return next(x for x in lines if x.startswith(f"| {method} |")).split("|")[column].strip()

    assert cell("kpod") == "20.0"  # the mean of 30 % and 10 %
    assert cell("std-cot") == "-"


def test_model_selection_table_marks_the_kept_epoch(report):
    kpod = _result("kpod", 2, {0})
    kpod["dev"] = [
        {"epoch": 0, "accuracy": 3.33},
        {"epoch": 1, "accuracy": 18.33},
        {"epoch": 2, "accuracy": 13.3},
    ]
    kpod["best_epoch"] = 1
    untrained = _result("untrained", 0, set())  # no dev evaluation: no row
    text = report.tables([kpod, untrained])
    assert "| epoch 0 | epoch 1 | epoch 2 | test | test, last epoch |" in text
    assert "| kpod | 2 | 3.3 | **18.3** | 13.3 | 10.00 | - |" in text
    assert "| untrained | 0 |" not in text
    assert "Without selection" not in text  # no std-cot run, no last-epoch figures


def test_last_epoch_figures_give_a_gap_without_selection(report):
    runs = []
    for method, seed, kept, last in (("std-cot", 0, {0}, {0, 1}), ("kpod", 0, {0, 1}, {0, 1, 2, 3})):
        r = _result(method, seed, kept)
        r["dev"], r["best_epoch"] = [{"epoch": 0, "accuracy": 5.0}, {"epoch": 1, "accuracy": 1.0}], 0
        r["last_epoch"] = {"accuracy": 10.0 * len(last), "ci95": [0, 100], "per_question": {}}
        runs.append(r)
    text = report.tables(runs)
    assert "| kpod | 0 | **5.0** | 1.0 | 20.00 | 40.00 |" in text
    assert (
        "Without selection (every run's last epoch): kpod 40.00, std-cot 20.00, gap **+20.00 points**."
        in text
    )
    runs[0]["last_epoch"] = None  # one run without the figure: no gap line
    assert "Without selection" not in report.tables(runs)


def test_gap_verdict_says_met_ruled_out_or_inconclusive(report):
    """The verdict follows the interval and the pooled p: +20 points with A never worse (met), a gap
    whose interval lies below +2 (ruled out), and a small sample around +2 (inconclusive)."""
    n = 400
    better = [({f"q{i}": i < 200 for i in range(n)}, {f"q{i}": i < 120 for i in range(n)})]
    assert "target met" in report.gap_verdict(better) and "includes 0" not in report.gap_verdict(better)
    # two seed pairs that disagree: +10 points on one (40 discordant questions, all A's), -3 on the other;
    # pooled 40 against 12 is p < 0.001, but a resample of the seeds can draw the second pair twice
    up = ({f"q{i}": i < 40 for i in range(n)}, {f"q{i}": False for i in range(n)})
    down = ({f"q{i}": False for i in range(n)}, {f"q{i}": i < 12 for i in range(n)})
    text = report.gap_verdict([up, down])
    assert "target met" in text and "the interval over seeds includes 0" in text
    # 50 discordant each way on 2000 questions (4 identical pairs): gap 0, interval about +-1.4
    same = [({f"q{i}": i < 500 for i in range(2000)}, {f"q{i}": 50 <= i < 550 for i in range(2000)})] * 4
    text = report.gap_verdict(same)
    assert "Paired gap +0.00 points" in text and "ruled out" in text and "4 seed pairs" in text
    small = [({f"q{i}": i < 6 for i in range(20)}, {f"q{i}": i < 5 for i in range(20)})]
    assert "inconclusive" in report.gap_verdict(small)


def test_steps_ood_and_weights_tables(report):
    """Accuracy by solution steps from the results' own ``questions``, the out-of-distribution rows
    with kpod against std-cot there, and each weighted run's contrast."""
    steps = {f"q{i}": {"steps": 3 if i < 6 else 5, "template": "1"} for i in range(10)}

    def with_extras(r, ood_right):
        ood = {f"o{i}": i in ood_right for i in range(4)}
        return {
            **r,
            "questions": steps,
            "ood": {
                "n": 4,
                "accuracy": 25.0 * len(ood_right),
                "ci95": [0, 100],
                "templates": ["7", "8"],
                "per_question": ood,
            },
        }

    std = with_extras(_result("std-cot", 0, {0, 1, 6}), {0})
    kpod = with_extras(_result("kpod", 0, {0, 1, 2, 6, 7}), {0, 1, 2})
    kpod["weights"] = {"contrast": 0.41, "kept_ratio": 0.55, "w_min": 0.02, "w_max": 0.99}
    text = report.tables([std, kpod])
    assert "| 3 steps (6 q) | 5 steps (4 q) |" in text
    assert "| std-cot | 33.3 (2/6) | 25.0 (1/4) |" in text and "| kpod | 50.0 (3/6) | 50.0 (2/4) |" in text
    assert "quantities" not in text  # the proxy is only for results without step counts
    # paired by steps: 3 steps kpod +q2 of 6 questions, 5 steps kpod +q7 of 4
    row = next(line for line in text.splitlines() if line.startswith("| kpod - std-cot | 0 | +16.7 ["))
    assert "| +25.0 [" in row
    assert "Out of distribution: 4 problems of 2 templates never trained on (7, 8)" in text
    assert "| kpod | 1 | 75.00 |" in text and "| std-cot | 1 | 25.00 |" in text
    assert "kpod - std-cot out of distribution: Paired gap +50.00 points" in text
    assert "| kpod | 0 | 0.410 | 0.550 | 0.020 | 0.990 |" in text


def test_written_arithmetic_pools_the_seeds_and_skips_runs_without_it(report):
    def with_arithmetic(r, equations, wrong, slipped):
        return {
            **r,
            "arithmetic": {
                "equations": equations,
                "wrong": wrong,
                "questions_with_slip": slipped,
                "questions": 10,
            },
        }

    runs = [
        with_arithmetic(_result("std-cot", 0, {0}), 20, 5, 4),
        with_arithmetic(_result("std-cot", 1, {0}), 30, 6, 5),
        with_arithmetic(_result("kpod", 0, {0}), 25, 10, 7),
        _result("kpod-no-weights", 0, {0}),  # recorded before the figure existed: no row
    ]
    text = report.tables(runs)
    # std-cot: 11 wrong of 50 written over 20 questions; per seed 25.0 and 20.0; 9 of 20 questions.
    assert "| std-cot | 2 | 2.50 | 22.0 | s0: 25.0; s1: 20.0 | 45.0 |" in text
    assert "| kpod | 1 | 2.50 | 40.0 | s0: 40.0 | 70.0 |" in text
    assert "| kpod-no-weights | 1 | " not in text.split("Written arithmetic")[1]


def test_departures_place_each_question_by_its_own_number_of_steps(report):
    steps = {
        "q0": {"steps": 3},
        "q1": {"steps": 3},
        "q2": {"steps": 5},
        "q3": {"steps": 5},
        "q4": {"steps": 2},
    }
    std = {**_result("std-cot", 0, {0}), "questions": steps}
    std["first_missing_step"] = {"q0": None, "q1": 2, "q2": 2, "q3": 4, "q4": 1}
    kpod = {**_result("kpod", 0, {0}), "questions": steps}
    kpod["first_missing_step"] = {"q0": 0, "q1": 1, "q2": 0, "q3": None, "q4": 0}
    # q1 (3 steps) at 2 and q3 (5 steps) at 4 are last steps; q2 (5 steps) at 2 a middle one.
    assert report.departures([std]) == {"first": 0, "middle": 1, "last": 3, "none": 1}
    assert report.departures([kpod]) == {"first": 3, "middle": 1, "last": 0, "none": 1}
    text = report.tables([std, kpod])
    assert "| std-cot | 1 | 0.0 (0) | 20.0 (1) | 60.0 (3) | 20.0 (1) |" in text
    assert "| kpod | 1 | 60.0 (3) | 20.0 (1) | 0.0 (0) | 20.0 (1) |" in text


def test_planned_pairs_follow_the_pilot_discordance(load_benchmark, tmp_path, monkeypatch):
    """Before the pilot pair: the minimum; after it: the pairs the pooled McNemar test needs for 2
    points at the pilot's discordance, within [min, max]; the suite's list grows to match."""
    accuracy = load_benchmark("accuracy")
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    suite = "cpu-multistep"
    assert accuracy.planned_pairs(suite) == 5
    assert accuracy.planned_pairs("cpu-small") is None
    (tmp_path / "accuracy").mkdir()
    n = 1000

    def write(method, right):
        path = accuracy.result_path(suite, "gsm-symbolic", method, 0)
        path.write_text(json.dumps({"per_question": {f"q{i}": i in right for i in range(n)}}))

    write("std-cot", set(range(400)))
    write("kpod", set(range(40, 440)))  # 80 discordant of 1000: 2 pairs would do, the minimum is 5
    assert accuracy.planned_pairs(suite) == 5
    write("kpod", set(range(150, 550)))  # 300 discordant: 2.8016^2 * 0.3 / 1000 / 0.02^2 = 5.9
    assert accuracy.planned_pairs(suite) == 6
    runs = accuracy.all_runs(suite)
    assert [s for d, m, s in runs if m == "kpod"] == list(range(6))
    assert runs[-1][1] == "kpod-no-progressive"  # the ablations after the seed pairs
    write("kpod", set(range(350, 750)))  # 700 discordant: 13.7, capped at 12
    assert accuracy.planned_pairs(suite) == 12


def test_every_comparison_pairs_only_the_seeds_both_ran(report):
    """Rows: each trained method against std-cot, kpod against each other trained method; counts and
    gap pooled over the seeds the two share (kpod-no-weights ran seed 0 only, so its rows use seed 0)."""
    results = [
        _result("untrained", 0, set()),
        _result("std-cot", 0, {0, 1, 2}),
        _result("std-cot", 1, {0, 6, 7}),
        _result("kpod", 0, {0, 1, 3, 4, 5}),  # against std-cot: 3 only kpod, 1 only std-cot
        _result("kpod", 1, {0, 6, 8}),  # against std-cot: 1 and 1
        _result("kpod-no-weights", 0, {1, 2}),  # against std-cot s0: 0 and 1; kpod s0: 0 and 4
    ]
    assert report.comparisons(["untrained", "std-cot", "kpod-no-weights", "kpod"]) == [
        ("kpod-no-weights", "std-cot"),
        ("kpod", "std-cot"),
        ("kpod", "kpod-no-weights"),
    ]
    text = report.tables(results)
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for cells in (line.split("|") for line in text.splitlines() if line.startswith("| "))
        if " - " in cells[1]
    }
    assert rows["kpod - std-cot"][:4] == ["0, 1", "4", "2", f"{mcnemar_exact(4, 2):.3g}"]
    assert rows["kpod - std-cot"][4].startswith("**+10.00**")  # (5 - 3 + 3 - 3) / 2 of 10 questions
    assert rows["kpod-no-weights - std-cot"][:3] == ["0", "0", "1"]
    assert rows["kpod-no-weights - std-cot"][4].startswith("**-10.00**")
    assert rows["kpod - kpod-no-weights"][:3] == ["0", "4", "1"]
    assert rows["kpod - kpod-no-weights"][4].startswith("**+30.00**")
    assert not any(name.startswith("untrained") or name.endswith("untrained") for name in rows)


def test_table1_ordering_is_read_against_the_papers(report):
    """With the baselines run, the paper's Table 1 methods (and std-cot) are ordered by mean accuracy
    and the order of the paper's methods is compared with the paper's; without a baseline, no line."""

    def ordering(results):
        return next(x for x in report.tables(results).splitlines() if x.startswith("Table 1's ordering"))

    results = [
        _result("std-cot", 0, {0, 1, 2, 3}),
        _result("scotd", 0, {0, 1, 2, 3, 4, 5}),
        _result("scotd", 1, {0, 1}),  # scotd's mean: 40.0
        _result("mcc-kd", 0, {0, 1, 2}),  # 30.0
        _result("kpod", 0, {0, 1, 2, 3, 4}),  # 50.0
    ]
    line = ordering(results)
    assert line == (
        "Table 1's ordering: here kpod 50.00 (1 seed) > scotd 40.00 (2 seeds) = std-cot 40.00 (1 seed) > "
        "mcc-kd 30.00 (1 seed); the paper "
        "(LLaMA-7B) kpod 71.02 > mcc-kd 65.76 > scotd 63.38 (a different order of its methods)."
    )
    results[3] = _result("mcc-kd", 0, {0, 1, 2, 3, 4, 5, 6, 7, 8})  # 90.0: above kpod
    line = ordering(results)
    assert line.startswith("Table 1's ordering: here mcc-kd 90.00 (1 seed) > kpod 50.00 (1 seed)")
    assert line.endswith("(a different order of its methods).")
    results[3] = _result("mcc-kd", 0, {0, 1, 2, 3, 4, 5, 6})  # 70.0
    results[4] = _result("kpod", 0, set(range(8)))  # 80.0 > 70.0 > 40.0, the paper's order
    line = ordering(results)
    assert line.endswith("(the same order of its methods).")
    results.append(_result("std-cot", 1, {0, 1, 2, 3}))  # every method two seeds: no counts
    results.append(_result("mcc-kd", 1, {0, 1, 2, 3, 4, 5, 6}))
    results.append(_result("kpod", 1, set(range(8))))
    assert ordering(results) == (
        "Table 1's ordering: here kpod 80.00 > mcc-kd 70.00 > scotd 40.00 = std-cot 40.00; the paper "
        "(LLaMA-7B) kpod 71.02 > mcc-kd 65.76 > scotd 63.38 (the same order of its methods)."
    )
    without = [r for r in results if r["method"] not in ("scotd", "mcc-kd")]
    assert "Table 1's ordering" not in report.tables(without)


def test_questions_without_a_reference_solution_say_nothing_about_steps(report, load_benchmark):
    """ASDiv's test set has answers only: the results record no steps there (older ones: 0 steps and
    no departure), and the report leaves those questions out of the tables by steps and departures
    instead of showing a "0 steps" column and 100 % "every result written"."""
    old = {f"q{i}": {"steps": 0} for i in range(10)}  # as the first cpu-asdiv result recorded it
    std = {**_result("std-cot", 0, {0, 1}), "questions": old, "first_missing_step": dict.fromkeys(old)}
    kpod = {**_result("kpod", 0, {0, 1, 2}), "questions": old, "first_missing_step": dict.fromkeys(old)}
    assert report.reference_steps(std) == {}
    assert report.by_steps([std]) == {}
    assert report.departures([std]) == {"first": 0, "middle": 0, "last": 0, "none": 0}
    text = report.tables([std, kpod])
    assert "0 steps" not in text and "by the number of steps" not in text
    assert "first depart from the reference" not in text
    # Questions that have a reference solution are still counted beside ones that do not.
    mixed = {**old, "q0": {"steps": 3}, "q1": {"steps": 4}}
    assert report.by_steps([{**std, "questions": mixed}]) == {3: (1, 1), 4: (1, 1)}

    from kpod.data.schema import Example
    from kpod.data.steps import split_steps

    accuracy = load_benchmark("accuracy")
    rationale = "Ann has 3 + 4 = 7 apples.\nShe eats 2, so 7 - 2 = 5 are left."
    with_steps = Example(qid="a", question="?", rationale=rationale, steps=split_steps(rationale), answer="5")
    answer_only = Example(qid="b", question="?", rationale="", steps=(), answer="5")
    assert accuracy.question_info([with_steps, answer_only]) == {"a": {"steps": 2}, "b": {}}
    predictions = [{"qid": "a", "generated": "3 + 4 = 7. 7 - 2 = 5."}, {"qid": "b", "generated": "5"}]
    assert accuracy.first_missing_steps(predictions, [with_steps, answer_only]) == {"a": None}
    predictions[0]["generated"] = "3 + 4 = 8. Then 6."  # never writes 7: departs at the first step
    assert accuracy.first_missing_steps(predictions, [with_steps, answer_only]) == {"a": 0}
