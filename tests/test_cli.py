import json
import subprocess
import sys
from pathlib import Path

import pytest

from kpod.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_data_stats_json_on_gsm8k_train(shared_data: Path, capsys) -> None:
    code, out, _ = run(["data", "stats", str(shared_data / "gsm8k/train.jsonl"), "--json"], capsys)
    stats = json.loads(out)
    assert code == 0
    assert stats["n_examples"] == 7473 and stats["n_questions"] == 7473
    assert stats["answer_parse_rate"] == 1.0
    assert 3.0 < stats["mean_steps"] < 4.5


@pytest.mark.parametrize("name", ["gsm8k/test.jsonl", "asdiv-gpt35/train.json", "asdiv-gpt35/test.json"])
def test_gold_answers_parse_completely(shared_data: Path, capsys, name: str) -> None:
    code, out, _ = run(["data", "stats", str(shared_data / name), "--json"], capsys)
    assert code == 0 and json.loads(out)["answer_parse_rate"] == 1.0


def test_stats_table_and_problems(tmp_path: Path, capsys) -> None:
    rows = [{"question": "q1", "answer": "1 + 1 = 2\n#### 3"}, {"question": "q2", "answer": "x\n#### ?"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(["data", "stats", str(path), "--skip-invalid"], capsys)
    assert code == 0
    assert "answer parse rate  50.00 %" in out
    assert "skipped 1 records" in out
    assert "end on a number other than the gold answer" in out


def test_synth_then_stats(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "arith.jsonl"
    code, out, _ = run(["data", "synth", "arithmetic", "-n", "50", "--out", str(out_file)], capsys)
    assert code == 0 and "wrote 50" in out
    code, out, _ = run(["data", "stats", str(out_file), "--json"], capsys)
    stats = json.loads(out)
    assert stats["n_examples"] == 50 and stats["answer_parse_rate"] == 1.0


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "a\\n#### 1"}\n{"question": "q2"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "kpod.cli", "data", "stats", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kpod: error: {path}, line 2, field 'answer': missing field"
    assert "Traceback" not in proc.stderr


def test_help_explains_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "stats", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--format", "--skip-invalid", "--keep-calculator", "--columns", "--json", "--tokenizer"):
        assert option in out


def test_weights_train_show_eval(tiny_causal: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "arith.jsonl"
    assert main(["data", "synth", "arithmetic", "-n", "16", "--seed", "2", "--out", str(data)]) == 0
    out_dir = tmp_path / "w"
    code = main(
        [
            "weights",
            "train",
            str(data),
            "--out",
            str(out_dir),
            "--student",
            str(tiny_causal),
            "--batch-size",
            "8",
            "--precision",
            "fp32",
            "--estimator",
            "score-function",
            "--samples",
            "2",
            "--kept-budget",
            "0.6",
        ]
    )
    assert (
        code == 0 and (out_dir / "weights.jsonl").is_file() and (out_dir / "weighter.safetensors").is_file()
    )
    saved = json.loads((out_dir / "config.json").read_text())
    assert (saved["estimator"], saved["samples"], saved["kept_budget"]) == ("score-function", 2, 0.6)
    assert saved["alpha"] == 0.5 and saved["batch_size"] == 8  # left out: the dataclass default
    capsys.readouterr()
    assert main(["weights", "eval", str(data), str(out_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"auc", "mean_w_keypoint", "mean_w_other", "kept_ratio", "contrast"} <= set(metrics)
    assert metrics["contrast"] == pytest.approx(
        metrics["mean_w_keypoint"] - metrics["mean_w_other"], abs=2e-4
    )
    assert main(["weights", "show", str(data), str(out_dir), "-n", "2"]) == 0
    assert capsys.readouterr().out.count("\x1b[48;5;") > 10
    page = tmp_path / "heat.html"
    assert main(["weights", "show", str(data), str(out_dir), "--html", str(page)]) == 0
    assert page.read_text().count('class="ex"') == 5
    assert "range from w = " in page.read_text()  # the legend gives the weights' true range


def test_model_commands_from_the_command_line_restart_on_a_fast_allocator(monkeypatch, tmp_path) -> None:
    """The console script (argv None) restarts a model command before it does any work; a call with
    argv (a notebook, a test) and a command that runs no model never do."""
    import kpod.allocator

    class Restarted(Exception):
        pass

    def restart():
        raise Restarted

    monkeypatch.setattr(kpod.allocator, "restart_on_fast_allocator", restart)
    missing = str(tmp_path / "missing")
    for command in (["eval", missing, missing], ["distill", missing, "--out", missing]):
        monkeypatch.setattr(sys, "argv", ["kpod", *command])
        with pytest.raises(Restarted):
            main()
    assert main(["eval", missing, missing]) == 2  # run in this process: the missing model's error
    monkeypatch.setattr(sys, "argv", ["kpod", "report", missing])
    assert main() == 2  # no model: no restart, the command's own error


def test_a_bad_fast_malloc_setting_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("KPOD_FAST_MALLOC", "maybe")
    monkeypatch.setattr(sys, "argv", ["kpod", "eval", str(tmp_path / "m"), str(tmp_path / "d")])
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("kpod: error: KPOD_FAST_MALLOC='maybe' in the environment") and err.count("\n") == 1
