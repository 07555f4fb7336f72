"""The distillation loop: over-fitting, methods, resume after SIGKILL, 2 processes == 1 process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kpod.data.loaders import make_example
from kpod.data.synthetic import arithmetic_examples
from kpod.distill import batches as batches_module
from kpod.distill.batches import global_batches, micro_batch_rows, process_share
from kpod.distill.checkpoint import STATE_FILE, latest_checkpoint
from kpod.distill.methods import METHODS, StageBuilder, get_method
from kpod.distill.trainer import TrainConfig, train
from kpod.errors import ConfigError
from kpod.io import write_jsonl
from kpod.models import load_model, load_tokenizer
from kpod.progressive.schedule import ScheduleConfig, plan_schedule
from kpod.weighting.weights import TokenWeights, rationale_key

PYTHON = sys.executable


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    """A tiny causal LM big enough to memorise a handful of rationales."""
    from tiny_models import build_causal

    return build_causal(tmp_path_factory.mktemp("tiny64"), hidden=64, layers=2)


def keypoint_weights(examples, tokenizer, keep: float = 1.0, other: float = 0.5) -> dict[str, TokenWeights]:
    """weights.jsonl rows from the synthetic ground truth: keypoint tokens ``keep``, others ``other``."""
    rows = {}
    for e in examples:
        enc = tokenizer(e.rationale, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        weights = [keep if any(s < k.end and k.start < t for k in e.keypoints) else other for s, t in offsets]
        rows[rationale_key(e)] = TokenWeights(
            key=rationale_key(e), qid=e.qid, offsets=offsets, weights=weights
        )
    return rows


def schedule_inputs(examples, stages: int) -> dict[str, list[int]]:
    """c_i(t) from a schedule planned with one unit of difficulty per step."""
    plan = plan_schedule(
        [[1.0] * len(e.steps) for e in examples],
        [0] * len(examples),
        ScheduleConfig(stages=stages, n_clusters=1),
    )
    return {rationale_key(e): plan.c[i].tolist() for i, e in enumerate(examples)}


def train_tiny_std_cot(model_dir, examples, out, epochs, eval_max_new_tokens, *, dev, test, **settings):
    """std-cot on a tiny causal model with these tests' usual settings (batch 2, lr 1e-2, fp32 unless
    ``settings`` say otherwise)."""
    student = load_model(str(model_dir))
    builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
    config = TrainConfig(
        method="std-cot",
        epochs=epochs,
        batch_size=2,
        lr=1e-2,
        eval_max_new_tokens=eval_max_new_tokens,
        **{"precision": "fp32", **settings},
    )
    return train(config, student, builder, out, dev=dev, test=test, progress=False)


def tiny_std_cot_losses(model_dir, examples, out, **settings) -> list[float]:
    """Each step's logged loss of :func:`train_tiny_std_cot` over 2 epochs, the first two examples
    as dev and test."""
    train_tiny_std_cot(model_dir, examples, out, 2, 6, dev=examples[:2], test=examples[:2], **settings)
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_global_batches_are_deterministic_and_cover_every_example():
    lengths = [5, 50, 7, 30, 8, 9, 40, 1, 2, 3]
    a = global_batches(lengths, 3, seed=1, epoch=2)
    assert a == global_batches(lengths, 3, seed=1, epoch=2)
    assert a != global_batches(lengths, 3, seed=1, epoch=3)
    assert sorted(i for b in a for i in b) == list(range(10))


def test_process_share_splits_a_batch_evenly_and_pads_short_ranks():
    batch = [10, 11, 12, 13, 14]
    shares = [process_share(batch, r, 2, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # same number of micro-batches on every rank
    assert sorted(i for s in shares for mb in s if mb.scale for i in mb.indices) == batch
    assert shares[1][1].scale == 0.0  # rank 1 has 2 examples: its second micro-batch is padding


def test_micro_batch_rows_auto_splits_long_batches_on_a_cpu_only():
    assert micro_batch_rows(8, 230, 3, "cpu") == 3  # a number is taken as it is
    assert micro_batch_rows(8, 230, "auto", "cuda") == 8  # a GPU takes the whole share
    assert micro_batch_rows(8, 100, "auto", "cpu") == 8  # 800 padded tokens: one pass
    assert micro_batch_rows(8, 230, "auto", "cpu") == 4  # 1,840: two equal passes
    assert micro_batch_rows(5, 300, "auto", "cpu") == 3  # 1,500: two passes, of 3 and 2
    assert micro_batch_rows(8, 500, "auto", "cpu") == 2  # 4,000: four passes
    assert micro_batch_rows(8, 5000, "auto", "cpu") == 1  # never fewer than one example a pass


def test_auto_micro_batches_train_as_the_whole_batch_does(tiny64, tmp_path, monkeypatch):
    """``micro_batch_size: auto`` over a small token budget splits each batch of 4 into passes
    of 1 or 2 examples (recorded), and the logged losses equal those of one pass per batch: the
    loss is normalised over the whole batch, whatever the split."""
    examples = arithmetic_examples(8, seed=4)

    def losses(out: Path, micro_batch_size: int | str) -> list[float]:
        student = load_model(str(tiny64))
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        config = TrainConfig(
            method="std-cot",
            epochs=2,
            batch_size=4,
            micro_batch_size=micro_batch_size,
            lr=1e-2,
            precision="fp32",
        )
        train(config, student, builder, out, progress=False)
        return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]

    whole = losses(tmp_path / "whole", 4)
    monkeypatch.setattr(batches_module, "AUTO_MICRO_BATCH_TOKENS", 64)
    sizes = []

    def recording(batch, rank, world, micro_batch_size):
        sizes.append(micro_batch_size)
        return process_share(batch, rank, world, micro_batch_size)

    monkeypatch.setattr("kpod.distill.trainer.process_share", recording)
    split = losses(tmp_path / "split", "auto")
    assert len(sizes) == 4 and all(1 <= size < 4 for size in sizes), sizes
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_with_the_steps_own_attention(tiny64, tmp_path):
    """With activation checkpointing the backward pass runs each layer's forward again; it must
    use the attention the step's forward used (eager here, the model's own being sdpa), or
    torch.utils.checkpoint refuses the recomputed tensors (the backward once ran outside the
    step's attention block). The logged losses equal those of the same run without it."""
    examples = arithmetic_examples(8, seed=4)

    def losses(out: Path, checkpointing: bool) -> list[float]:
        student = load_model(str(tiny64), gradient_checkpointing=checkpointing)
        assert student.model.config._attn_implementation == "sdpa"
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        config = TrainConfig(
            method="std-cot", epochs=2, batch_size=4, lr=1e-2, precision="bf16", attention="eager"
        )
        train(config, student, builder, out, progress=False)
        return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]

    plain = losses(tmp_path / "plain", False)
    torch.testing.assert_close(losses(tmp_path / "checkpointed", True), plain, rtol=1e-5, atol=1e-6)


def test_cpu_steps_log_resident_memory_and_whether_the_heap_was_trimmed(tiny64, tmp_path, monkeypatch):
    examples = arithmetic_examples(4, seed=4)
    sizes = iter([100 * 2**20, 120 * 2**20, 400 * 2**20, 410 * 2**20])  # trim at the third step only
    monkeypatch.setattr("kpod.allocator.resident_bytes", lambda: next(sizes))
    monkeypatch.setattr("kpod.allocator.release_freed_memory", lambda: None)
    train_tiny_std_cot(tiny64, examples, tmp_path / "run", 2, 6, dev=None, test=None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["rss_mib"], r["heap_trim"]) for r in rows] == [
        (100, False),
        (120, False),
        (400, True),
        (410, False),
    ]


def test_methods_build_the_right_examples(tiny_causal):
    tok = load_tokenizer(str(tiny_causal))
    examples = arithmetic_examples(3, seed=2)
    weights = keypoint_weights(examples, tok, keep=0.9, other=0.2)
    inputs = schedule_inputs(examples, stages=3)
    kpod = StageBuilder(get_method("kpod"), examples, tok, weights=weights, inputs=inputs)
    std = StageBuilder(get_method("std-cot"), examples, tok)
    k0, s0 = kpod.stage(0), std.stage(0)
    # Stage 0 of KPOD gives leading steps as input: fewer targets than std-cot, weights below 1.
    assert all(k.n_targets < s.n_targets for k, s in zip(k0, s0, strict=True))
    assert any(0 < w < 1 for k in k0 for w in k.weights)
    assert all(w == 1.0 for s in s0 for w in s.weights)
    # From stage T on, KPOD trains on the whole rationale: same labels as std-cot.
    assert [k.labels for k in kpod.stage(3)] == [s.labels for s in s0]
    no_prog = StageBuilder(get_method("kpod-no-progressive"), examples, tok, weights=weights)
    assert [k.labels for k in no_prog.stage(0)] == [s.labels for s in s0]
    answer_only = StageBuilder(get_method("answer-only"), examples, tok).stage(0)
    assert all(a.n_targets < 15 for a in answer_only)  # "Therefore, the answer is N." and the end
    sbs = StageBuilder(get_method("step-by-step"), examples, tok, step_by_step_alpha=0.3).stage(0)
    assert len(sbs) == 2 * len(examples)
    assert {round(w, 6) for e in sbs[1::2] for w in e.weights} == {0.3}
    with pytest.raises(ConfigError, match="needs token weights"):
        StageBuilder(get_method("kpod"), examples, tok, inputs=inputs)
    with pytest.raises(ConfigError, match="needs a schedule"):
        StageBuilder(get_method("kpod"), examples, tok, weights=weights)
    assert set(METHODS) >= {
        "kpod",
        "std-cot",
        "answer-only",
        "step-by-step",
        "kpod-no-weights",
        "kpod-no-progressive",
        "kpod-no-diversity",
        "kpod-uniform-difficulty",
    }


def test_bad_train_config_names_the_key():
    with pytest.raises(ConfigError, match="method.*kpod"):
        TrainConfig(method="kpdo")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize("method", ["std-cot", "kpod", "scotd", "mcc-kd"])
def test_tiny_model_overfits_to_100_percent(method, tiny64, tmp_path):
    """A tiny model memorises four rationales and answers all four questions from scratch (the
    baselines that sample rationales get two per question: the original and a reworded one)."""
    student = load_model(str(tiny64))
    examples = arithmetic_examples(4, seed=1)
    questions = examples
    if method in ("scotd", "mcc-kd"):
        reworded = [
            make_example(qid=e.qid, question=e.question, rationale="First. " + e.rationale, answer=e.answer)
            for e in examples
        ]
        examples = examples + reworded
    weights = keypoint_weights(examples, student.tokenizer) if method == "kpod" else None
    inputs = schedule_inputs(examples, stages=20) if method == "kpod" else None
    builder = StageBuilder(get_method(method), examples, student.tokenizer, weights=weights, inputs=inputs)
    if method == "kpod":
        assert builder.n_input_steps(0, 0) > 0  # the early stages really are progressive
    config = TrainConfig(
        method=method,
        epochs=300,
        batch_size=4,
        micro_batch_size=4,
        lr=3e-3,
        precision="fp32",
        warmup_ratio=0.0,
        lr_schedule="constant",
        eval_max_new_tokens=400,
        keep_checkpoints=1,
    )
    result = train(config, student, builder, tmp_path / "run", test=questions, progress=False)
    assert result.test["accuracy"] == 100.0, result.test
    assert result.stage_loss[-1] < 0.05
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 300 and log[-1]["loss"] < log[0]["loss"]
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    # The student is saved in the standard format and loads in plain transformers.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.student_dir)
    trained = student.model.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained[name])


def test_lora_student_saves_merged_or_adapter(tiny_causal, tmp_path):
    from kpod.models import StudentConfig

    examples = arithmetic_examples(4, seed=3)
    for merge in (False, True):
        student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8).load(seed=0)
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        config = TrainConfig(
            method="std-cot", epochs=1, batch_size=2, precision="fp32", merge_lora=merge, lr=1e-2
        )
        result = train(config, student, builder, tmp_path / f"run-{merge}", progress=False)
        saved = Path(result.student_dir)
        assert (saved / "adapter_config.json").is_file() is not merge
        # Either form loads through kpod (an adapter directory names its base model).
        reloaded = load_model(str(saved), trainable=False)
        ids = torch.tensor([student.tokenizer("Q: 1 + 2").input_ids])
        student.model.eval()
        torch.testing.assert_close(
            reloaded.model(ids).logits, student.model(ids).logits, atol=1e-4, rtol=1e-4
        )


def _write_run(tmp_path: Path, model: Path, n: int = 8, **train) -> tuple[Path, Path]:
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [e.to_dict() for e in arithmetic_examples(n, seed=5)])
    config = tmp_path / "config.yaml"
    settings = {
        "method": "std-cot",
        "epochs": 6,
        "batch_size": 2,
        "micro_batch_size": 1,
        "lr": 3e-3,
        "precision": "fp32",
        "select": "last",
        **train,
    }
    config.write_text(
        yaml.safe_dump({"student": {"name": str(model), "finetune": "full"}, "train": settings})
    )
    return data, config


def _params(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "model.safetensors"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(tiny64, tmp_path):
    data, config = _write_run(tmp_path, tiny64, n=16, epochs=3, save_every=1, keep_checkpoints=100)
    cmd = [PYTHON, "-m", "kpod.cli", "distill", str(data), "--config", str(config), "--quiet", "--out"]
    whole = tmp_path / "whole"
    subprocess.run(cmd + [str(whole)], check=True, env=_env(), capture_output=True)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        cmd + [str(broken)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (broken / "checkpoints" / "step-00000005").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Every checkpoint directory under its final name is complete; partial ones only under .tmp names.
    for ckpt in (broken / "checkpoints").iterdir():
        if ckpt.name.startswith("step-"):
            assert (ckpt / STATE_FILE).is_file() and (ckpt / "model.safetensors").is_file()
    resumed_at = json.loads((latest_checkpoint(broken / "checkpoints") / STATE_FILE).read_text())["step"]
    # 16 examples / batch 2 = 8 steps per stage, 3 stages: killed inside the first stage.
    assert 5 <= resumed_at < 8, resumed_at
    assert not (broken / "student").exists()

    refused = subprocess.run(cmd + [str(broken)], env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr  # never restarts by accident
    out = subprocess.run(
        cmd + [str(broken), "--resume"], check=True, env=_env(), capture_output=True, text=True
    )
    assert f"(step {resumed_at} of 24)" in out.stderr
    a, b = _params(whole), _params(broken)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in (broken / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # the log neither repeats nor misses a step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_with_the_same_parameters_as_one(tiny64, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun; gloo on a CPU-only machine).

    accelerate's own ``--cpu`` flag starts a single process unless launched under MPI, so the
    multi-process launcher is used; the trainer asks accelerate for CPU when there is no GPU.
    """
    data, config = _write_run(tmp_path, tiny64, batch_size=4, epochs=2)
    args = ["-m", "kpod.cli", "distill", str(data), "--config", str(config), "--quiet", "--json", "--out"]
    one = tmp_path / "one"
    subprocess.run([PYTHON, *args, str(one)], check=True, env=_env(), capture_output=True)
    two = tmp_path / "two"
    launch = [
        PYTHON,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    out = subprocess.run(launch + [*args, str(two)], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["processes"] for r in reports] == [2]  # one report, from a 2-process run
    a, b = _params(one), _params(two)
    initial = load_model(str(tiny64)).model.state_dict()
    moved = max(float((a[n] - initial[n]).abs().max()) for n in a)
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(
    tiny_causal, tmp_path, capsys, monkeypatch
):
    """Resume from a mid-run LoRA checkpoint (later ones removed, as after a crash) == the whole run."""
    import shutil

    from kpod.models import StudentConfig

    examples = arithmetic_examples(8, seed=4)
    config = TrainConfig(
        method="std-cot",
        epochs=2,
        batch_size=2,
        precision="fp32",
        lr=1e-2,
        save_every=1,
        keep_checkpoints=100,
        select="last",
    )

    def run(out: Path) -> dict[str, torch.Tensor]:
        student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8, lora_dropout=0.0).load(seed=0)
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        train(config, student, builder, out, progress=False)
        return {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}

    import kpod.distill.trainer

    monkeypatch.setattr(kpod.distill.trainer, "cpu_allocator_hint", lambda: "note: preload jemalloc")
    whole = run(tmp_path / "run")
    assert "note: preload jemalloc" in capsys.readouterr().err  # the CPU allocator hint is shown
    ckpts = tmp_path / "run" / "checkpoints"
    saved = latest_checkpoint(ckpts) / "model.safetensors"
    from safetensors.torch import load_file

    assert set(load_file(str(saved))) == set(whole)  # adapter weights only, no frozen base
    for ckpt in ckpts.iterdir():
        if int(ckpt.name.split("-")[1]) > 5:
            shutil.rmtree(ckpt)
    shutil.rmtree(tmp_path / "run" / "student")
    capsys.readouterr()
    resumed = run(tmp_path / "run")
    assert "step-00000005 (step 5 of 8)" in capsys.readouterr().err  # it resumed, it did not restart
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5)


def test_last_epoch_is_also_tested_when_dev_selection_keeps_an_earlier_one(
    tiny_causal, tmp_path, monkeypatch
):
    """Dev accuracies 50, 0, 0 %: selection keeps epoch 0; ``test_last_epoch`` then scores the last
    epoch's model too, exactly as a run without selection would."""
    import kpod.distill.trainer as trainer

    examples = arithmetic_examples(4, seed=3)
    real = trainer._evaluate
    dev_scores = iter([50.0, 0.0, 0.0])

    def scripted_dev(model, student, data, config, fmt, prefix, out):
        result = real(model, student, data, config, fmt, prefix, out)
        return result if out is not None else {**result, "accuracy": next(dev_scores)}

    monkeypatch.setattr(trainer, "_evaluate", scripted_dev)

    def run(name: str, **settings) -> tuple:
        result = train_tiny_std_cot(
            tiny_causal, examples, tmp_path / name, 3, 12, dev=examples[:2], test=examples, **settings
        )
        texts = {
            f.name: [json.loads(x)["generated"] for x in f.read_text().splitlines()]
            for f in (tmp_path / name).glob("test_predictions*.jsonl")
        }
        return result, texts

    selected, selected_texts = run("selected", test_last_epoch=True)
    plain, plain_texts = run("plain", select="last")
    assert [d["epoch"] for d in selected.dev] == [0, 1, 2] and selected.best_epoch == 0
    assert plain.best_epoch is None and plain.test_last is None and plain.dev == []
    assert selected_texts["test_predictions_last.jsonl"] == plain_texts["test_predictions.jsonl"]
    assert selected_texts["test_predictions.jsonl"] != plain_texts["test_predictions.jsonl"]
    assert selected.test_last["qids"] == selected.test["qids"]


def test_progressive_epochs_train_stages_1_to_T_and_only_whole_rationale_epochs_are_selected(
    tiny_causal, tmp_path, monkeypatch
):
    """kpod with T = 2 over 4 epochs: epoch 0 trains stage 1 (not the schedule's stage 0), epoch 1
    stage T = 2 (whole rationales), epochs 2-3 whole rationales; dev is scored, and a model kept,
    only from epoch 1 on, even when an earlier epoch would have scored higher."""
    import kpod.distill.trainer as trainer

    student = load_model(str(tiny_causal))
    examples = arithmetic_examples(6, seed=2)
    inputs = schedule_inputs(examples, stages=2)
    builder = StageBuilder(
        get_method("kpod"),
        examples,
        student.tokenizer,
        inputs=inputs,
        weights=keypoint_weights(examples, student.tokenizer),
    )
    stages_built = []
    real_stage = builder.stage
    builder.stage = lambda t: stages_built.append(t) or real_stage(t)
    scored = []
    real = trainer._evaluate

    def scripted_dev(model, student_, data, config, fmt, prefix, out):
        result = real(model, student_, data, config, fmt, prefix, out)
        if out is None:
            scored.append(len(scored))
            return {**result, "accuracy": [10.0, 10.0, 5.0][len(scored) - 1]}
        return result

    monkeypatch.setattr(trainer, "_evaluate", scripted_dev)
    config = TrainConfig(
        method="kpod", epochs=4, batch_size=6, micro_batch_size=6, precision="fp32", eval_max_new_tokens=8
    )
    result = train(config, student, builder, tmp_path / "run", dev=examples[:2], progress=False)
    assert stages_built[1:] == [1, 2, 3, 4]  # after the set-up's count: stage t in epoch t
    assert any(i[0] > 0 for i in inputs.values()) and any(i[1] > 0 for i in inputs.values())
    assert real_stage(1) != real_stage(0) and real_stage(2) == real_stage(4)  # stage T is whole
    assert [d["epoch"] for d in result.dev] == [1, 2, 3]  # epoch 0 (stage 1 < T) is not eligible
    assert result.best_epoch == 2  # 10 % at epochs 1 and 2: the later one
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == [1, 2, 3, 4]


def test_compile_runs_the_compiled_forward_in_training_steps_only(tiny_causal, tmp_path, monkeypatch):
    """``train.compile``: every training forward goes through the forward the trainer compiled
    once (stood in for here by the eager forward, counted), dev and test generation through the
    model's own; the losses are those of a run without it (the stand-in computes the same), and
    the option is part of the run's identity only when on (kpod.config.key_data)."""
    import kpod.distill.trainer as trainer
    from kpod.config import key_data

    made, calls = [], {"train": 0, "eval": 0}

    def counting_forward(model):
        own = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward

        def forward(*args, **kwargs):
            calls["train" if model.training else "eval"] += 1
            return own(*args, **kwargs)

        made.append(forward)
        return forward

    monkeypatch.setattr(trainer, "compiled_forward", counting_forward)
    examples = arithmetic_examples(4, seed=3)

    def run(name: str, **settings):
        return tiny_std_cot_losses(tiny_causal, examples, tmp_path / name, **settings)

    plain = run("plain")
    assert not made and calls == {"train": 0, "eval": 0}
    # A checkpoint written before the option existed resumes as a run without it.
    state_file = latest_checkpoint(tmp_path / "plain" / "checkpoints") / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["compile"]
    state_file.write_text(json.dumps(state))
    assert run("plain") == plain
    compiled = run("compiled", compile=True)
    assert len(made) == 1  # made once, for every epoch
    # The first step (where compilation happens) logs what torch.compile did, no other step does.
    log = [json.loads(x) for x in (tmp_path / "compiled" / "train_log.jsonl").read_text().splitlines()]
    assert set(log[0]["compile"]) == {"seconds", "caches", "unique_graphs", "graph_breaks"}
    assert not any("compile" in row for row in log[1:])
    plain_log = (tmp_path / "plain" / "train_log.jsonl").read_text()
    assert '"compile"' not in plain_log
    assert calls == {"train": 4, "eval": 0}  # 2 epochs x 2 steps of one micro-batch; generation eager
    assert compiled == pytest.approx(plain, rel=1e-6)
    assert "compile" not in key_data(TrainConfig()) and key_data(TrainConfig(compile=True))["compile"] is True
    # Without a C++ compiler (inductor's need on a CPU) the run stops at once, naming the option:
    # inductor told to search for one that does not exist (its search is cached per candidate list,
    # so emptying PATH after an earlier compilation in this process would not be seen). Through
    # inductor's own patch: pytest's monkeypatch would delete the setting on undo (a config
    # proxy's attribute is not in its __dict__), breaking every later compilation in the process.
    import torch._inductor.config as inductor_config

    with (
        inductor_config.patch({"cpp.cxx": ("kpod-test-no-such-c++",)}),
        pytest.raises(ConfigError, match="train.compile: no C\\+\\+ compiler"),
    ):
        run("no-compiler", compile=True)
    assert inductor_config.cpp.cxx != ("kpod-test-no-such-c++",)
    assert not (tmp_path / "no-compiler" / "checkpoints").exists()


def test_bf16_training_steps_share_the_norms_casts_with_the_same_losses(tiny_causal, tmp_path, monkeypatch):
    """Under bf16 the trainer's steps run with each norm's output cast once for all its readers
    (kpod.models.norm_casts_shared; its exactness: test_distill_parts), entered once per epoch
    around the training steps and never around generation; every logged loss is the same bit for
    bit as a run without it."""
    import kpod.distill.trainer as trainer

    real, entered = trainer.norm_casts_shared, []

    @contextlib.contextmanager
    def recording(model, dtype):
        assert dtype == torch.bfloat16 and model.training
        with real(model, dtype) as n:
            entered.append(n)
            yield n

    examples = arithmetic_examples(4, seed=3)
    monkeypatch.setattr(trainer, "norm_casts_shared", recording)
    shared = tiny_std_cot_losses(tiny_causal, examples, tmp_path / "shared", precision="bf16")
    assert entered == [2 * 2, 2 * 2]  # two epochs; two norms in each of the two layers
    monkeypatch.setattr(trainer, "norm_casts_shared", lambda model, dtype: contextlib.nullcontext(0))
    assert tiny_std_cot_losses(tiny_causal, examples, tmp_path / "plain", precision="bf16") == shared
    entered.clear()
    monkeypatch.setattr(trainer, "norm_casts_shared", recording)
    tiny_std_cot_losses(tiny_causal, examples, tmp_path / "fp32")
    assert entered == []  # fp32 has no casts to share


def test_select_from_epoch_leaves_earlier_epochs_out_of_dev_scoring(tiny_causal, tmp_path, monkeypatch):
    """std-cot over 3 epochs with ``select_from_epoch: 2``: dev is scored after epochs 2 and 3 only
    (0-based 1 and 2), and the best of those is kept even when epoch 1 would have scored higher."""
    import kpod.distill.trainer as trainer

    examples = arithmetic_examples(4, seed=3)
    real = trainer._evaluate
    dev_scores = iter([20.0, 10.0, 99.0])  # a third dev evaluation would be picked: there must be none

    def scripted_dev(model, student, data, config, fmt, prefix, out):
        result = real(model, student, data, config, fmt, prefix, out)
        return result if out is not None else {**result, "accuracy": next(dev_scores)}

    monkeypatch.setattr(trainer, "_evaluate", scripted_dev)
    student = load_model(str(tiny_causal))
    builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
    config = TrainConfig(
        method="std-cot", epochs=3, batch_size=2, precision="fp32", eval_max_new_tokens=8, select_from_epoch=2
    )
    result = train(config, student, builder, tmp_path / "run", dev=examples[:2], progress=False)
    assert [d["epoch"] for d in result.dev] == [1, 2]
    assert [d["accuracy"] for d in result.dev] == [20.0, 10.0] and result.best_epoch == 1
    with pytest.raises(ConfigError, match="select_from_epoch"):
        TrainConfig(method="std-cot", epochs=3, select_from_epoch=4)


def test_run_killed_while_scoring_test_resumes_its_generations(tiny_causal, tmp_path, monkeypatch):
    """The test evaluation of a finished run records its generations batch by batch; killed there,
    the run started again restores its last checkpoint and generates only the batches not yet
    recorded, ending with the predictions of an uninterrupted run."""
    examples = arithmetic_examples(6, seed=5)
    config = TrainConfig(
        method="std-cot",
        epochs=2,
        batch_size=2,
        lr=1e-2,
        precision="fp32",
        eval_batch_size=2,
        eval_max_new_tokens=10,
    )

    import kpod.evaluate as kpod_evaluate

    real = kpod_evaluate._generate_batch
    monkeypatch.setattr(kpod_evaluate, "REFILL_BATCHES", 1)  # chunks (the resume unit) of one batch

    def run(name: str, die_at: int | None = None) -> tuple[list[int], list[str]]:
        student = load_model(str(tiny_causal))
        calls = []

        def counted(model, tokenizer, enc, *args):
            if len(calls) == die_at:
                raise KeyboardInterrupt
            calls.append(enc["input_ids"].shape[0])
            return real(model, tokenizer, enc, *args)

        monkeypatch.setattr(kpod_evaluate, "_generate_batch", counted)
        builder = StageBuilder(get_method("std-cot"), examples, student.tokenizer)
        train(config, student, builder, tmp_path / name, test=examples, progress=False)
        rows = (tmp_path / name / "test_predictions.jsonl").read_text().splitlines()
        return calls, [json.loads(r)["generated"] for r in rows]

    calls, reference = run("whole")
    assert calls == [2, 2, 2]
    with pytest.raises(KeyboardInterrupt):
        run("killed", die_at=1)  # killed during the second of three test batches
    assert (tmp_path / "killed" / "test_predictions.jsonl.partial").exists()
    calls, resumed = run("killed")
    assert calls == [2, 2]  # the first batch came from the partial file
    assert resumed == reference
    assert not (tmp_path / "killed" / "test_predictions.jsonl.partial").exists()


def test_a_new_method_with_its_own_loss_is_one_class_and_one_registration(tiny_causal, tmp_path):
    """The extension point: a Method subclass with its own examples and loss, registered, is
    accepted by the config and trained by the loop with that loss."""
    from kpod.distill.methods import METHODS, Method, register

    class LastStepOnly(Method):
        """Trains on the last step only (its own examples) with a loss scaled by 0.5."""

        calls = []

        def stage_examples(self, builder, stage):
            return [
                builder.target(i, max(0, len(e.steps) - 1), weighted=False)
                for i, e in enumerate(builder.examples)
            ]

        def loss(self, model, batch, student):
            self.calls.append(int((batch["labels"] != -100).sum()))
            return 0.5 * super().loss(model, batch, student)

    with pytest.raises(ConfigError):
        TrainConfig(method="last-step-only")
    method = register(LastStepOnly("last-step-only"))
    try:
        with pytest.raises(ConfigError):
            register(LastStepOnly("last-step-only"))  # names are unique
        student = load_model(str(tiny_causal))
        examples = arithmetic_examples(4, seed=1)
        builder = StageBuilder(get_method("last-step-only"), examples, student.tokenizer)
        whole = StageBuilder(get_method("std-cot"), examples, student.tokenizer).stage(0)
        built = builder.stage(0)
        assert all(b.n_input_steps == len(e.steps) - 1 for b, e in zip(built, examples, strict=True))
        assert sum(b.n_targets for b in built) < sum(w.n_targets for w in whole)
        config = TrainConfig(
            method="last-step-only", epochs=1, batch_size=4, micro_batch_size=2, precision="fp32"
        )
        result = train(config, student, builder, tmp_path / "run", progress=False)
        assert result.steps == 1 and len(method.calls) == 2  # two micro-batches, our loss each time
        assert sum(method.calls) == sum(b.n_targets for b in built)
    finally:
        del METHODS["last-step-only"]


def test_training_steps_attend_eagerly_on_a_cpu_and_generation_keeps_sdpa(tiny_causal, tmp_path, monkeypatch):
    """``train.attention: auto`` (the default): on a CPU under bf16 every training forward of a
    batch up to EAGER_ATTENTION_MAX_LENGTH tokens attends with ``eager``, longer ones (the tiny
    tokenizer makes some) and dev and test generation with the model's own ``sdpa``; the losses are
    a run with ``sdpa``'s. The run is fp32, where the losses must agree to float rounding; auto
    keeps sdpa in fp32, so the choice is asked for bf16's (the rule itself: test_distill_parts),
    and the trainer is checked to pass its own precision. A checkpoint written before the option
    existed ran with sdpa: it resumes under ``attention: sdpa`` and is refused under ``auto``,
    naming it."""
    from transformers.models.llama import modeling_llama

    import kpod.distill.trainer as trainer
    from kpod.models import EAGER_ATTENTION_MAX_LENGTH, inner_model

    chosen, seen, calls = [], [], []
    own_choice, own_switch = trainer.training_attention, trainer.attention_implementation
    eager = modeling_llama.eager_attention_forward

    def choosing(setting, length, device_type, compiled, precision):
        assert precision == "fp32"  # the trainer's own
        chosen.append((length, own_choice(setting, length, device_type, compiled, "bf16")))
        return chosen[-1][1]

    @contextlib.contextmanager
    def switching(model, name):
        with own_switch(model, name):
            seen.append(inner_model(model).config._attn_implementation)
            yield

    def counting(module, *args, **kwargs):
        calls.append("train" if module.training else "eval")
        return eager(module, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_attention", choosing)
    monkeypatch.setattr(trainer, "attention_implementation", switching)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting)
    examples = arithmetic_examples(4, seed=3)

    def run(name: str, **settings):
        return tiny_std_cot_losses(tiny_causal, examples, tmp_path / name, **settings)

    auto = run("auto")
    assert len(chosen) == 4  # 2 epochs x 2 steps of one micro-batch
    assert [name for _, name in chosen] == [
        "eager" if length <= EAGER_ATTENTION_MAX_LENGTH else None for length, _ in chosen
    ]
    n_eager = sum(name == "eager" for _, name in chosen)
    assert 0 < n_eager < 4  # both kinds of batch occur here
    assert seen == [name or "sdpa" for _, name in chosen]
    # two layers, each run again in its backward pass (train.recompute_elementwise); no generation
    # went through eager
    assert calls == ["train"] * n_eager * 2 * 2
    chosen.clear(), seen.clear()
    assert run("sdpa", attention="sdpa") == pytest.approx(auto, rel=1e-5)
    assert seen == ["sdpa"] * 4 and len(calls) == n_eager * 2 * 2
    # A checkpoint from before the option: no "attention" in its stored config.
    state_file = latest_checkpoint(tmp_path / "sdpa" / "checkpoints") / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["attention"]
    state_file.write_text(json.dumps(state))
    assert run("sdpa", attention="sdpa") == pytest.approx(auto, rel=1e-5)
    with pytest.raises(ConfigError, match=r"different settings \(attention\)"):
        run("sdpa")
