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
