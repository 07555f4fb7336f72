import dataclasses
import json

import pytest
import torch

from kpod.cli import main
from kpod.data.synthetic import arithmetic_examples
from kpod.evaluate import answer_complete, evaluate, generate
from kpod.io import write_jsonl
from kpod.models import load_model
from kpod.stats import wilson_interval


def test_wilson_interval_by_hand() -> None:
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    lo, hi = wilson_interval(157, 314)  # ASDiv's test size: about +-5.5 points at 50 %
    assert 0.05 < hi - 0.5 < 0.06


@pytest.mark.parametrize(
    "text, done",
    [
        ("5 + 3 = 8. Therefore, the answer is 8.", False),  # "8." might still become "8.5"
        ("5 + 3 = 8. Therefore, the answer is 8. ", True),
        ("Therefore, the answer is 8.5. Next", True),
        ("Therefore, the answer is 8\nQ:", True),
        ("Therefore, the answer is (B).", True),
        ("5 + 3 = 8. So far", False),
    ],
)
def test_answer_phrase_completion(text: str, done: bool) -> None:
    assert answer_complete(text) is done


def test_batched_generation_equals_one_at_a_time(tiny_causal) -> None:
    loaded = load_model(str(tiny_causal), trainable=False)
    prompts = [f"Q: {e.question}\nA: Let's think step by step." for e in arithmetic_examples(5, seed=2)]
    batched = generate(
        loaded.model, loaded.tokenizer, prompts, batch_size=5, max_new_tokens=12, progress=False
    )
    single = [
        generate(loaded.model, loaded.tokenizer, [p], batch_size=1, max_new_tokens=12, progress=False)[0]
        for p in prompts
    ]
    assert batched == single  # left padding and length sorting change nothing under greedy decoding


@pytest.mark.parametrize("grouped", [False, True])
def test_compacting_generation_equals_model_generate(tiny_causal, tmp_path, monkeypatch, grouped) -> None:
    """Dropping finished sequences from the batch and refilling it from the next prompts (the
    default for causal models) gives exactly ``model.generate``'s greedy texts in fp32, with
    sequences ending at different steps: a tiny model with spread-out random weights, whose token
    10 (made end-of-sequence) comes at steps 4 to 28 depending on the prompt, plus one prompt
    stopped by the length limit. With batches of 3 over chunks of 12 prompts the batch is refilled
    several times (each refill is a prefill: counted), never holds more than 3 sequences, and joins
    caches of different lengths. ``grouped``: a model with 4 query heads reading 2 key/value heads,
    and KV-cache buffers with one position of room, so that every layer's buffers are reallocated
    as they grow, between the rows' drops and joins. Finished rows leave the batch at once or in
    groups (``DROP_FINISHED_SHARE``): the texts are the same."""
    import kpod.kv_cache as kv_cache

    if grouped:
        from tiny_models import build_causal

        monkeypatch.setattr(kv_cache, "INITIAL_ROOM", 1)
        loaded = load_model(str(build_causal(tmp_path / "gqa", heads=4, kv_heads=2)), trainable=False)
    else:
        loaded = load_model(str(tiny_causal), trainable=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    loaded.model.generation_config.eos_token_id = 10
    prompts = [f"Q: {e.question}\nA: Let's think step by step." for e in arithmetic_examples(12, seed=2)]
    prompts[3] += " Think hard about it before you answer the question."  # prompt lengths differ

    def run(compact: bool, batch_size: int) -> list[str]:
        return generate(
            loaded.model,
            loaded.tokenizer,
            prompts,
            batch_size=batch_size,
            max_new_tokens=32,
            progress=False,
            compact=compact,
        )

    reference = run(False, 6)
    ends = [
        len(loaded.tokenizer(t, add_special_tokens=False).input_ids) for t in reference
    ]  # tokens before the end-of-sequence (which decoding drops)
    assert len(set(ends)) >= 4 and min(ends) < 16  # sequences end at different steps
    assert run(True, 6) == reference

    model_forward, rows = loaded.model.forward, []

    def counted(*args, **kwargs):
        rows.append(tuple(kwargs["input_ids"].shape))
        return model_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counted)
    import kpod.evaluate as kpod_evaluate

    monkeypatch.setattr(kpod_evaluate, "REFILL_BATCHES", 4)
    assert run(True, 3) == reference
    prefills = [r for r in rows if r[1] > 1]
    assert len(prefills) >= 4 and sum(r[0] for r in prefills) == 12  # refilled, each prompt once
    assert max(r[0] for r in rows) <= 3
    # Finished rows dropped as each ends (share 0), or kept in the batch until all have ended or a
    # refill comes (share 1): the same texts; kept rows make the decoding steps wider.
    decoded = {}
    for share in (0.0, 1.0):
        monkeypatch.setattr(kpod_evaluate, "DROP_FINISHED_SHARE", share)
        rows.clear()
        assert run(True, 6) == reference
        assert max(r[0] for r in rows) <= 6
        decoded[share] = sum(r[0] for r in rows if r[1] == 1)  # rows summed over decoding steps
    assert decoded[1.0] > decoded[0.0]


def test_evaluate_records_every_prediction(tiny_causal, tmp_path) -> None:
    loaded = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(6, seed=1)
    result = evaluate(
        loaded.model, loaded.tokenizer, examples, max_new_tokens=8, out=tmp_path / "p.jsonl", progress=False
    )
    assert result.n == 6 and 0 <= result.correct <= 6
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["qid"] for r in rows] == [e.qid for e in examples]
    assert all(set(r) >= {"generated", "predicted", "gold", "correct"} for r in rows)
    assert result.correct == sum(r["correct"] for r in rows)


def test_auto_batch_size_is_sized_from_the_longest_prompt_and_recorded(tiny_causal, monkeypatch) -> None:
    """``batch_size: auto`` (the default) asks :func:`kpod.kv_cache.auto_batch_size` for the longest
    prompt plus the new tokens, at 4 bytes a value in fp32 and 2 in bf16 (``auto`` precision: 4 to
    choose it, then 2 once bf16 is chosen), generates exactly as that batch size given by hand does,
    and says which batch it used."""
    import kpod.kv_cache as kv_cache
    import kpod.precision as kpod_precision
    from kpod.errors import ConfigError
    from kpod.prompt import PromptFormat, render_prompt

    loaded = load_model(str(tiny_causal), trainable=False)
    model, tok = loaded.model, loaded.tokenizer
    examples = arithmetic_examples(7, seed=4)
    longer = examples[2].question + " Think hard about it before you answer the question."
    examples[2] = dataclasses.replace(examples[2], question=longer)  # the longest prompt
    asked = []

    def sized(model, positions, bytes_per_value, budget=None):
        asked.append((positions, bytes_per_value))
        return 2

    monkeypatch.setattr(kv_cache, "auto_batch_size", sized)
    auto = evaluate(model, tok, examples, max_new_tokens=8, progress=False)
    fixed = evaluate(model, tok, examples, max_new_tokens=8, progress=False, batch_size=2)
    fmt = PromptFormat()
    prompts = [render_prompt(e.question, fmt, tok) for e in examples]
    longest = max(len(ids) for ids in tok(prompts, add_special_tokens=fmt.style == "paper")["input_ids"])
    assert longest > len(tok(prompts[0], add_special_tokens=fmt.style == "paper")["input_ids"])
    assert asked == [(longest + 8, 4)]
    assert auto.batch_size == fixed.batch_size == 2 and auto.summary()["batch_size"] == 2
    assert [p["generated"] for p in auto.predictions] == [p["generated"] for p in fixed.predictions]
    asked.clear()
    low = evaluate(model, tok, examples, max_new_tokens=8, progress=False, precision="bf16")
    assert low.precision == "bf16"
    assert asked == [(longest + 8, 2)]
    asked.clear()
    monkeypatch.setattr(kpod_precision, "choose", lambda model, batch_size, cache=True: "bf16")
    chosen = evaluate(model, tok, examples, max_new_tokens=8, progress=False, precision="auto")
    assert chosen.precision == "bf16" and asked == [(longest + 8, 4), (longest + 8, 2)]
    for bad in (0, "many"):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer or 'auto'"):
            evaluate(model, tok, examples, max_new_tokens=8, progress=False, batch_size=bad)


def test_eval_cli(tiny_causal, tmp_path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [e.to_dict() for e in arithmetic_examples(4, seed=3)])
    out = tmp_path / "preds.jsonl"
    assert (
        main(["eval", str(tiny_causal), str(data), "--max-new-tokens", "6", "--json", "--out", str(out)]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 100 and len(summary["ci95"]) == 2
    assert summary["batch_size"] == 128  # auto: the tiny model's cache is far below the budget
    assert len(out.read_text().splitlines()) == 4
    argv = ["eval", str(tiny_causal), str(data), "--max-new-tokens", "6", "--json", "--batch-size", "3"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batch_size"] == 3
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["0"])
    assert "must be a positive integer or auto" in capsys.readouterr().err


def test_mcnemar_exact_on_hand_computed_cases():
    from kpod.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    # b=0, c=5: 2 * (1/32) = 0.0625
    assert abs(mcnemar_exact(0, 5) - 0.0625) < 1e-12
    # b=1, c=9: 2 * (1 + 10) / 1024
    assert abs(mcnemar_exact(1, 9) - 22 / 1024) < 1e-12
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_paired_gap_interval_by_hand_and_its_coverage_by_simulation():
    """The gap is the mean over seed pairs of the accuracy difference; the bootstrap interval over
    seed pairs and questions covers a known true gap in about 95 % of simulated benchmarks whose
    runs differ by question difficulty and by seed."""
    import numpy as np

    from kpod.stats import paired_gap_interval

    qs = [f"q{i}" for i in range(40)]
    a0 = {q: i < 24 for i, q in enumerate(qs)}  # 60 %
    b0 = {q: i < 16 for i, q in enumerate(qs)}  # 40 %
    a1 = {q: i < 20 for i, q in enumerate(qs)}  # 50 %
    b1 = {q: i < 20 for i, q in enumerate(qs)}  # 50 %
    gap, low, high = paired_gap_interval([(a0, b0), (a1, b1)], resamples=2000)
    assert gap == pytest.approx(0.1) and low <= 0.1 <= high
    gap1, low1, high1 = paired_gap_interval([(a0, b0)], resamples=2000)  # A never worse: low > 0
    assert gap1 == pytest.approx(0.2) and 0 < low1 <= 0.2 <= high1
    assert paired_gap_interval([({**a0, "extra": True}, b0)])[0] == pytest.approx(0.2)  # shared only
    with pytest.raises(ValueError):
        paired_gap_interval([])

    rng = np.random.default_rng(1)
    true_gap, covered, sims = 0.03, 0, 120
    for sim in range(sims):
        base = rng.uniform(0.1, 0.8, size=300)  # question difficulty, new questions each benchmark
        pairs = []
        for _ in range(4):  # seed pairs: each run has its own seed effect
            pa = np.clip(base + true_gap + rng.normal(0, 0.02), 0, 1)
            pb = np.clip(base + rng.normal(0, 0.02), 0, 1)
            ra, rb = rng.random(300) < pa, rng.random(300) < pb
            pairs.append(
                ({f"q{i}": bool(x) for i, x in enumerate(ra)}, {f"q{i}": bool(x) for i, x in enumerate(rb)})
            )
        _, low, high = paired_gap_interval(pairs, resamples=800, seed=sim)
        covered += low <= true_gap <= high
    assert 0.88 <= covered / sims <= 1.0


def test_mcnemar_detectable_gap_by_hand_and_by_simulation():
    import random

    from kpod.stats import mcnemar_detectable_gap, mcnemar_exact, mcnemar_pairs_needed

    # (1.95996 + 0.84162) * sqrt(0.1225 / 942)
    gap = mcnemar_detectable_gap(0.1225, 942)
    assert abs(gap - 2.80158 * (0.1225 / 942) ** 0.5) < 1e-5
    assert mcnemar_detectable_gap(0.1225, 4 * 942) == pytest.approx(gap / 2)  # 4x the pairs, half the gap
    assert mcnemar_pairs_needed(gap, 0.1225, 942) == 1
    assert mcnemar_pairs_needed(gap / 2, 0.1225, 942) == 4
    assert mcnemar_pairs_needed(gap / 2.01, 0.1225, 942) == 5
    with pytest.raises(ValueError):
        mcnemar_detectable_gap(0.0, 942)
    # at that gap the exact test rejects at 5 % in about 80 % of simulated replications
    rng = random.Random(0)
    p_b, p_c = (0.1225 + gap) / 2, (0.1225 - gap) / 2
    rejections = 0
    trials = 400
    for _ in range(trials):
        b = c = 0
        for _ in range(942):
            u = rng.random()
            b += u < p_b
            c += p_b <= u < p_b + p_c
        rejections += mcnemar_exact(b, c) < 0.05
    assert 0.70 <= rejections / trials <= 0.90


def test_interrupted_evaluation_resumes_from_its_partial_file(tiny_causal, tmp_path, monkeypatch) -> None:
    import kpod.evaluate as kpod_evaluate
    from kpod.evaluate import weights_fingerprint

    monkeypatch.setattr(kpod_evaluate, "REFILL_BATCHES", 1)  # chunks (the resume unit) of one batch
    loaded = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(7, seed=4)  # batches of 2: 2 + 2 + 2 + 1 questions
    settings = dict(max_new_tokens=8, batch_size=2, progress=False)
    reference = evaluate(loaded.model, loaded.tokenizer, examples, **settings)
    key = weights_fingerprint(loaded.model)
    out, partial = tmp_path / "p.jsonl", tmp_path / "p.jsonl.partial"
    real_batch, calls = kpod_evaluate._generate_batch, []

    def run(resume_key: str, die_at: int | None = None, **changed):
        """evaluate(), counting the batches generated; killed at the batch ``die_at`` (0-based)."""

        def generate_batch(model, tokenizer, enc, *args):
            if len(calls) == die_at:
                raise KeyboardInterrupt
            calls.append(enc["input_ids"].shape[0])
            return real_batch(model, tokenizer, enc, *args)

        calls.clear()
        monkeypatch.setattr(kpod_evaluate, "_generate_batch", generate_batch)
        return evaluate(
            loaded.model, loaded.tokenizer, examples, out=out, resume_key=resume_key, **settings | changed
        )

    with pytest.raises(KeyboardInterrupt):
        run(key, die_at=2)
    assert not out.exists() and len(partial.read_text().splitlines()) == 4  # two batches recorded
    with open(partial, "a") as handle:
        handle.write('{"qid": "cut short by the ki')  # a torn last line is dropped
    resumed = run(key)
    assert calls == [2, 1]  # only the two batches not recorded
    assert [p["generated"] for p in resumed.predictions] == [p["generated"] for p in reference.predictions]
    assert resumed.correct == reference.correct and not partial.exists()

    # Generations recorded for another model (key) or other settings are not reused.
    with pytest.raises(KeyboardInterrupt):
        run("another model", die_at=3)
    run(key)
    assert calls == [2, 2, 2, 1]
    with pytest.raises(KeyboardInterrupt):
        run(key, die_at=3)
    run(key, max_new_tokens=9)
    assert calls == [2, 2, 2, 1]

    partial.write_text('{"resume_key": "a file kpod did not write"}\n')
    with pytest.warns(UserWarning, match="starting the evaluation over"):
        again = run(key)
    assert calls == [2, 2, 2, 1] and again.correct == reference.correct and not partial.exists()


def test_weights_fingerprint_follows_the_trainable_weights(tiny_causal) -> None:
    import torch

    from kpod.evaluate import weights_fingerprint

    loaded = load_model(str(tiny_causal), trainable=False)
    before = weights_fingerprint(loaded.model)
    assert weights_fingerprint(loaded.model) == before  # deterministic
    with torch.no_grad():
        next(loaded.model.parameters())[0, 0] += 0.5
    assert weights_fingerprint(loaded.model) != before


def test_auto_precision_is_measured_once_per_machine_and_cached(tiny_causal, tmp_path, monkeypatch) -> None:
    import torch

    from kpod import precision

    monkeypatch.delenv("KPOD_GENERATION_PRECISION", raising=False)
    monkeypatch.setenv("KPOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # measured whatever this CPU is
    model = load_model(str(tiny_causal), trainable=False).model
    rates = {torch.float32: 50.0, torch.bfloat16: 80.0}
    calls = []

    def fake_rate(m, batch_size, limit=None, **kw):
        dtype = next(m.parameters()).dtype
        calls.append((dtype, batch_size, limit))
        slower = limit is not None and batch_size * precision.MEASURED_TOKENS / rates[dtype] > limit
        return None if slower else rates[dtype]

    monkeypatch.setattr(precision, "time_generation", fake_rate)
    assert precision.choose(model, 16) == "bf16"  # the faster one
    # bf16 first; fp32 stopped once it has taken as long as bf16's timed decoding
    assert calls == [(torch.bfloat16, 16, None), (torch.float32, 16, 16 * precision.MEASURED_TOKENS / 80.0)]
    assert next(model.parameters()).dtype == torch.float32  # measured on a copy
    cached = json.loads((tmp_path / "cache" / precision.CACHE_FILE).read_text())
    (entry,) = cached.values()
    assert entry == {"choice": "bf16", "fp32_tokens_per_s": None, "bf16_tokens_per_s": 80.0}
    rates[torch.bfloat16] = 10.0
    assert precision.choose(model, 16) == "bf16" and len(calls) == 2  # from the cache: not measured again
    assert precision.choose(model, 4) == "fp32" and len(calls) == 4  # another batch size: measured
    assert json.loads((tmp_path / "cache" / precision.CACHE_FILE).read_text())[
        precision.cache_key(model, 4)
    ] == {"choice": "fp32", "fp32_tokens_per_s": 50.0, "bf16_tokens_per_s": 10.0}
    # A large batch is timed with MAX_TIMED_ROWS rows, and every larger batch reads that answer.
    assert precision.choose(model, 128) == "fp32"
    assert [c[:2] for c in calls[-2:]] == [(torch.bfloat16, 32), (torch.float32, 32)]
    rates[torch.bfloat16] = 90.0
    assert precision.choose(model, 64) == "fp32" and len(calls) == 6  # cached under 32 rows
    assert precision.choose(model, 33) == "fp32" and precision.choose(model, 32) == "fp32" and len(calls) == 6
    monkeypatch.setenv("KPOD_GENERATION_PRECISION", "fp32")
    assert precision.choose(model, 32) == "fp32" and len(calls) == 6  # the environment decides
    monkeypatch.setenv("KPOD_GENERATION_PRECISION", "fp8")
    with pytest.raises(Exception, match="fp32 or bf16"):
        precision.choose(model, 32)


def test_a_timed_generation_past_its_limit_stops_and_says_none(tiny_causal) -> None:
    """``time_generation`` with a limit: a rate when the decoding fits in it, ``None`` when it
    does not (a limit of 0 stops it at its first forward pass), and the model without the timer's
    hook afterwards either way."""
    from kpod import precision

    model = load_model(str(tiny_causal), trainable=False).model.eval()
    rate = precision.time_generation(model, 2, new_tokens=3, prompt_tokens=8, limit=600.0)
    assert rate is not None and rate > 0
    forwards = []
    handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    assert precision.time_generation(model, 2, new_tokens=3, prompt_tokens=8, limit=0.0) is None
    handle.remove()
    assert len(forwards) == 1  # stopped at its first forward pass, not after the decoding
    assert not model._forward_pre_hooks


def test_evaluate_in_bf16_uses_a_copy_and_says_so(tiny_causal, tmp_path) -> None:
    import torch

    loaded = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(4, seed=2)
    low = evaluate(
        loaded.model, loaded.tokenizer, examples, precision="bf16", max_new_tokens=12, progress=False
    )
    assert low.precision == "bf16" and low.summary()["precision"] == "bf16"
    assert next(loaded.model.parameters()).dtype == torch.float32  # the caller's model is untouched
    full = evaluate(
        loaded.model, loaded.tokenizer, examples, precision="auto", max_new_tokens=12, progress=False
    )
    assert full.precision == "fp32"  # KPOD_GENERATION_PRECISION=fp32 in the test suite


def test_the_bf16_generation_copy_of_a_lora_student_has_its_adapters_merged(tiny_causal) -> None:
    """The bf16 copy that generates has no LoRA layers left (each adapted projection is one
    product), computes what the adapted fp32 model computes up to bf16 rounding, and leaves the
    student being trained as it was: adapters in place, weights in fp32."""
    from kpod.models import LoraSettings
    from kpod.precision import bf16_copy

    loaded = load_model(str(tiny_causal), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output (B starts at zero)
    loaded.model.eval()
    low = bf16_copy(loaded.model)
    assert not any("lora" in name for name, _ in low.named_modules())
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert any("lora_B" in name for name, _ in loaded.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ids = loaded.tokenizer(["Q: 3 apples and 4 more. A:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = loaded.model.get_base_model()
        with loaded.model.disable_adapter():
            unadapted = base(input_ids=ids).logits
        adapted = loaded.model(input_ids=ids).logits
        merged = low(input_ids=ids).logits.float()
    assert (adapted - unadapted).abs().max() > 0.1  # the adapters matter here
    assert (merged - adapted).abs().max() < 0.1 * (adapted - unadapted).abs().max()


def test_precision_timing_runs_kpods_decoding_loop_for_every_token(
    tiny_causal, tiny_seq2seq, monkeypatch
) -> None:
    """kpod.precision times what evaluations run: for a causal student kpod's own decoding loop,
    each row for exactly the timed number of tokens (no answer or end-of-sequence stops it); an
    encoder-decoder still through model.generate."""
    import kpod.evaluate as kpod_evaluate
    from kpod import precision

    real, lengths = kpod_evaluate._greedy_compacting, []

    def counted(*args, **kwargs):
        tokens = real(*args, **kwargs)
        lengths.append([len(t) for t in tokens])
        return tokens

    monkeypatch.setattr(kpod_evaluate, "_greedy_compacting", counted)
    model = load_model(str(tiny_causal), trainable=False).model
    assert precision.time_generation(model, 3, new_tokens=7, prompt_tokens=5) > 0
    assert lengths == [[4, 4, 4], [7, 7, 7]]  # the warm-up, then the timed run
    seq2seq = load_model(str(tiny_seq2seq), trainable=False).model
    assert precision.time_generation(seq2seq, 2, new_tokens=3, prompt_tokens=5) > 0
    assert len(lengths) == 2


def test_paired_comparison_counts_the_discordant_questions_of_the_shared_ones(tmp_path):
    """A vs B on the questions both answered: 9 solved only by A, 3 only by B, 40 shared (a 41st
    answered by A alone is left out); the run report reads the same from saved predictions."""
    from kpod.report import paired_comparisons, paired_verdict
    from kpod.stats import mcnemar_detectable_gap, mcnemar_exact, paired_comparison

    qs = [f"q{i}" for i in range(40)]
    a = {q: i < 20 or 30 <= i < 34 for i, q in enumerate(qs)}  # 24 right
    b = {q: 11 <= i < 26 for i, q in enumerate(qs)}  # 15 right: 11-19 both, 20-25 only B
    a["extra"] = True
    c = paired_comparison(a, b)
    # Only A: 0-10 and 30-33 (15); only B: 20-25 (6).
    assert (c["n"], c["a_only"], c["b_only"]) == (40, 15, 6)
    assert c["gap"] == pytest.approx((24 - 15) / 40)
    assert c["p"] == mcnemar_exact(15, 6)
    assert c["detectable"] == pytest.approx(mcnemar_detectable_gap(21 / 40, 40))
    assert c["ci95"][0] < c["gap"] < c["ci95"][1]
    same = paired_comparison(b, dict(b))
    assert same["detectable"] is None and same["p"] == 1.0 and same["gap"] == 0
    with pytest.raises(ValueError, match="share no test question"):
        paired_comparison({"x": True}, {"y": True})

    for method, right in (("std-cot", b), ("kpod", a), ("kpod-no-weights", b)):
        folder = tmp_path / f"train-{method}"
        folder.mkdir()
        rows = [{"qid": q, "correct": ok} for q, ok in right.items()]
        (folder / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = {r["method"]: r for r in paired_comparisons(tmp_path)}
    assert set(rows) == {"kpod", "kpod-no-weights"}
    assert (rows["kpod"]["a_only"], rows["kpod"]["b_only"]) == (15, 6)
    assert "kpod - std-cot: +22.5 points" in paired_verdict(rows["kpod"])
    assert "not distinguishable" in paired_verdict(rows["kpod"])  # p = 0.078
    assert "answered every question alike" in paired_verdict(rows["kpod-no-weights"])
    assert paired_comparisons(tmp_path, baseline="scotd") == []
