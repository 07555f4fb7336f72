import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpod.progressive.maths import (
    difficulty_budget,
    select_stage,
    selection_value,
    step_difficulty,
    value_function,
)
from kpod.progressive.schedule import ScheduleConfig, output_difficulty, plan_schedule


def test_step_difficulty_by_hand() -> None:
    logprobs = [math.log(0.5), math.log(0.25)]
    # Uniform: the mean NLL.
    assert step_difficulty(logprobs) == pytest.approx((math.log(2) + math.log(4)) / 2)
    # Weights 0 and ln 3: softmax = (1/4, 3/4).
    expected = 0.25 * math.log(2) + 0.75 * math.log(4)
    assert step_difficulty(logprobs, [0.0, math.log(3)]) == pytest.approx(expected)
    assert step_difficulty([], None) == 0.0


def test_pacing_by_hand() -> None:
    # B = 100, C0 = 30, T = 4, p = 0.5: D(1) = 30 + 70 * (1/4)^1.5 = 38.75.
    assert difficulty_budget(0, 100, 30, 4) == 30
    assert difficulty_budget(1, 100, 30, 4) == pytest.approx(38.75)
    assert difficulty_budget(4, 100, 30, 4) == 100
    assert difficulty_budget(9, 100, 30, 4) == 100
    values = [difficulty_budget(t, 100, 30, 10) for t in range(11)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def test_value_function_by_hand() -> None:
    # Delta D = 10, Delta H = 7, clusters of sizes 4 and 1, beta = 2: -(3) + 2 * (2 + 1) = 3.
    assert value_function(10, 7, [4, 1, 0], beta=2) == 3


def brute_force(gains, clusters, budget, beta):
    best = 0.0
    for r in range(len(gains) + 1):
        for subset in itertools.combinations(range(len(gains)), r):
            if sum(gains[i] for i in subset) <= budget + 1e-12:
                best = max(best, selection_value(subset, gains, clusters, beta))
    return best


instances = st.integers(min_value=1, max_value=9).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.integers(min_value=0, max_value=2), min_size=n, max_size=n),
        st.floats(min_value=0, max_value=30, allow_nan=False),
        st.sampled_from([0.0, 1.0, 12.0]),
    )
)


@settings(max_examples=300, deadline=None)
@given(instances)
def test_greedy_reaches_half_of_the_optimum_and_is_feasible(instance) -> None:
    gains, clusters, budget, beta = instance
    chosen = select_stage(gains, clusters, budget, beta, n_clusters=3)
    assert len(set(chosen)) == len(chosen)
    assert sum(gains[i] for i in chosen) <= budget + 1e-9
    assert (
        selection_value(chosen, gains, clusters, beta)
        >= 0.5 * brute_force(gains, clusters, budget, beta) - 1e-9
    )


def test_greedy_is_often_optimal_on_random_instances() -> None:
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(200):
        n = int(rng.integers(3, 10))
        gains = rng.uniform(0, 5, n).round(2).tolist()
        clusters = rng.integers(0, 3, n).tolist()
        budget = float(rng.uniform(0, sum(gains)))
        opt = brute_force(gains, clusters, budget, 12.0)
        ratios.append(
            selection_value(select_stage(gains, clusters, budget, 12.0, 3), gains, clusters, 12.0) / opt
            if opt
            else 1.0
        )
    assert min(ratios) >= 0.5 and np.mean(ratios) > 0.9


@given(
    st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 3)), min_size=2, max_size=8),
    st.data(),
)
def test_value_is_monotone_and_submodular(items, data) -> None:
    gains = [g for g, _ in items]
    clusters = [k for _, k in items]
    n = len(items)
    a = set(data.draw(st.sets(st.integers(0, n - 1))))
    b = a | set(data.draw(st.sets(st.integers(0, n - 1))))
    x = data.draw(st.integers(0, n - 1).filter(lambda i: i not in b))  # noqa: B023
    f = lambda s: selection_value(sorted(s), gains, clusters, 12.0)  # noqa: E731
    assert f(b) >= f(a) - 1e-9  # monotone
    assert f(a | {x}) - f(a) >= f(b | {x}) - f(b) - 1e-9  # diminishing returns


def random_problem(n: int, seed: int):
    rng = np.random.default_rng(seed)
    diffs = [rng.uniform(0.1, 3.0, int(rng.integers(1, 8))) for _ in range(n)]
    clusters = rng.integers(0, 5, n).tolist()
    return diffs, clusters


@pytest.mark.parametrize("beta", [0.0, 12.0])
def test_schedule_invariants(beta: float) -> None:
    diffs, clusters = random_problem(300, seed=1)
    config = ScheduleConfig(stages=8, beta=beta)
    sched = plan_schedule(diffs, clusters, config)
    c = sched.c
    n_steps = np.array([len(d) for d in diffs])
    assert c.shape == (300, 9)
    assert np.all((c >= 0) & (c <= n_steps[:, None]))
    assert np.all(np.diff(c, axis=1) <= 0)  # c_i(t) never increases
    inputs = sched.stage_inputs([f"r{i}" for i in range(300)])
    assert np.all(c[:, -1] == 0) and all(inputs.n_input_steps(f"r{i}", 20) == 0 for i in range(300))
    assert [inputs.n_input_steps(f"r{i}", 3) for i in range(300)] == c[:, 3].tolist()
    assert np.all(np.diff(c[:, :-1], axis=1) >= -config.step_size)  # at most Delta_s per stage
    for t in range(1, config.stages):
        h_prev = output_difficulty(diffs, c[:, t - 1])
        h_t = output_difficulty(diffs, c[:, t])
        assert h_t - h_prev <= sched.budget[t] - h_prev + 1e-9  # Delta H <= Delta D
        assert sched.achieved[t] == pytest.approx(h_t)
    # Stage 0 reaches (close to) C0 without exceeding it, from "answer only".
    assert sched.achieved[0] <= sched.budget[0] + 1e-9
    assert sched.achieved[0] >= 0.9 * sched.budget[0]
    assert sched.budget[0] == pytest.approx(0.3 * sum(d.sum() for d in diffs))
    again = plan_schedule(diffs, clusters, config)
    assert np.array_equal(again.c, c)


def test_diversity_spreads_selection_over_clusters() -> None:
    # Two clusters: cluster 0 has many cheap questions, cluster 1 slightly dearer ones.
    diffs = [np.array([1.0, 1.0])] * 20 + [np.array([1.2, 1.2])] * 20
    clusters = [0] * 20 + [1] * 20
    plain = plan_schedule(diffs, clusters, ScheduleConfig(stages=4, beta=0.0, n_clusters=2))
    diverse = plan_schedule(diffs, clusters, ScheduleConfig(stages=4, beta=12.0, n_clusters=2))
    spread = lambda s: min(s.cluster_counts[0]) / max(1, max(s.cluster_counts[0]))  # noqa: E731
    assert spread(diverse) > spread(plain)


def test_difficulty_scoring_projects_only_the_steps_tokens(tiny_causal, monkeypatch) -> None:
    """The output projection (and its softmax over the vocabulary) sees the steps' tokens only,
    not the question's: as many rows as the examples have step tokens, fewer than their tokens.
    (That the difficulties are Eq. 8 of the full logits is the next test's.)"""
    from kpod.data.synthetic import arithmetic_examples
    from kpod.models import load_model
    from kpod.progressive import difficulty
    from kpod.prompt import render_example, tokenize_rendered

    student = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(3, seed=4)
    rows = []
    real = difficulty.linear_token_logprobs
    monkeypatch.setattr(difficulty, "linear_token_logprobs", lambda h, *a: rows.append(len(h)) or real(h, *a))
    difficulty.score_difficulties(examples, student, None, batch_size=3, progress=False)
    tokenized = [
        tokenize_rendered(render_example(e, tokenizer=student.tokenizer), student.tokenizer) for e in examples
    ]
    steps = sum(
        1 for t, e in zip(tokenized, examples, strict=True) for s in t.segments if 0 <= s < len(e.steps)
    )
    assert rows == [steps] and steps < sum(len(t.input_ids) - 1 for t in tokenized)


def test_difficulty_scoring_matches_eq8_and_resumes(tiny_causal, tmp_path) -> None:
    import torch

    from kpod.data.synthetic import arithmetic_examples
    from kpod.models import load_model
    from kpod.progressive.difficulty import cluster_questions, question_embeddings, score_difficulties
    from kpod.prompt import render_example, tokenize_rendered
    from kpod.weighting.weights import TokenWeights, rationale_key

    student = load_model(str(tiny_causal), trainable=False)
    examples = arithmetic_examples(6, seed=4)
    cache = tmp_path / "difficulty.jsonl"
    uniform = score_difficulties(examples[:3], student, None, batch_size=2, cache=cache, progress=False)
    assert len(cache.read_text().splitlines()) == 3
    both = score_difficulties(examples, student, None, batch_size=4, cache=cache, progress=False)
    assert len(cache.read_text().splitlines()) == 6  # resumed: only the 3 new ones were scored
    assert all(both[k] == v for k, v in uniform.items())
    # Recompute one example's step difficulties by hand: mean NLL of each step's tokens.
    e = examples[4]
    t = tokenize_rendered(render_example(e, tokenizer=student.tokenizer), student.tokenizer)
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([t.input_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    for k, d in enumerate(both[rationale_key(e)]):
        pos = [p for p, s in enumerate(t.segments) if s == k]
        expected = -float(sum(logp[p - 1, t.input_ids[p]] for p in pos)) / len(pos)
        assert d == pytest.approx(expected, rel=1e-4)
    # Weights concentrated on one token per step make that token's NLL the difficulty (Eq. 8 softmax).
    rows = {}
    for ex in examples:
        enc = student.tokenizer(ex.rationale, add_special_tokens=False, return_offsets_mapping=True)
        rows[rationale_key(ex)] = TokenWeights(
            rationale_key(ex), ex.qid, enc["offset_mapping"], [0.5] * len(enc["input_ids"])
        )
    flat = score_difficulties(examples, student, rows, progress=False)
    # Equal weights give the uniform result (softmax of a constant).
    assert flat[rationale_key(e)] == pytest.approx(both[rationale_key(e)], rel=1e-5)
    # Weights that differ inside each step (a ramp over the rationale): Eq. 8 by hand, per step.
    from kpod.weighting.weights import rendered_token_weights

    ramp_rows = {}
    for ex in examples:
        enc = student.tokenizer(ex.rationale, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        ramp_rows[rationale_key(ex)] = TokenWeights(
            rationale_key(ex), ex.qid, enc["offset_mapping"], [4.0 * i / max(1, n - 1) for i in range(n)]
        )
    ramped = score_difficulties(examples, student, ramp_rows, progress=False)
    w_tok = rendered_token_weights(e, t, ramp_rows[rationale_key(e)])
    for k, d in enumerate(ramped[rationale_key(e)]):
        pos = [p for p, s in enumerate(t.segments) if s == k]
        w = torch.tensor([w_tok[p] for p in pos], dtype=torch.float64)
        assert len(set(w.tolist())) > 1  # the weights really differ inside this step
        soft = torch.softmax(w, 0)
        expected = -float(sum(soft[j] * logp[p - 1, t.input_ids[p]] for j, p in enumerate(pos)))
        assert d == pytest.approx(expected, rel=1e-4)
        reversed_soft = torch.softmax(w.flip(0), 0)
        wrong = -float(sum(reversed_soft[j] * logp[p - 1, t.input_ids[p]] for j, p in enumerate(pos)))
        assert abs(wrong - expected) > 1e-6 * abs(expected)  # a reversal inside the step would show
    emb = question_embeddings([x.question for x in examples], student)
    assert emb.shape == (6, 32)
    assert sorted(set(cluster_questions(emb, 3).tolist())) == [0, 1, 2]


def test_schedule_cli_plans_and_plots(tiny_causal, tmp_path, capsys) -> None:
    import json

    from kpod.cli import main

    data = tmp_path / "a.jsonl"
    assert main(["data", "synth", "arithmetic", "-n", "30", "--out", str(data)]) == 0
    out = tmp_path / "plan"
    assert (
        main(
            [
                "schedule",
                "plan",
                str(data),
                "--out",
                str(out),
                "--student",
                str(tiny_causal),
                "--epochs",
                "8",
                "--clusters",
                "3",
            ]
        )
        == 0
    )
    plan = json.loads((out / "schedule.json").read_text())
    assert len(plan["c"]) == 30 and len(plan["c"][0]) == 5
    assert (out / "schedule.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["schedule", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "budget/B" in shown and "input steps" in shown and "first step is generated in" in shown
    # A schedule written before schedules recorded their step counts: read from difficulty.jsonl.
    del plan["n_steps"]
    (out / "schedule.json").write_text(json.dumps(plan))
    assert main(["schedule", "show", str(out)]) == 0
    assert capsys.readouterr().out == shown
    (out / "difficulty.jsonl").unlink()
    assert main(["schedule", "show", str(out)]) == 0
    assert "input steps" not in capsys.readouterr().out  # nothing to read them from: the old table


def test_schedule_exposure_by_hand() -> None:
    """Three rationales of 3, 2 and 4 steps over stages 0..2: the share of all 9 steps given as
    input per stage, the share generated whole, and how often the first step is generated."""
    from kpod.progressive.schedule import Schedule
    from kpod.report import schedule_table

    schedule = Schedule(
        c=np.array([[2, 1, 0], [1, 0, 0], [3, 1, 0]]),
        budget=[1.0, 2.0, 3.0],
        achieved=[1.0, 2.0, 3.0],
        advanced=[3, 2, 2],
        cluster_counts=[[3], [2], [2]],
        total_difficulty=3.0,
        config=ScheduleConfig(stages=2),
        n_steps=[3, 2, 4],
    )
    exposure = schedule.exposure()
    assert exposure["input_share"] == pytest.approx([6 / 9, 2 / 9, 0.0])
    assert exposure["whole_share"] == pytest.approx([0.0, 1 / 3, 1.0])
    # First steps generated at stages 1..2: row 0 at 2 only, row 1 at both, row 2 at 2 only.
    assert exposure["first_step_share"] == pytest.approx(4 / 6)
    assert "first step is generated in 67 % of stages 1..2" in schedule_table(schedule)
    assert Schedule.from_dict(schedule.to_dict()).n_steps == [3, 2, 4]
    plan = plan_schedule([[1.0, 2.0, 0.5], [3.0, 1.0]], [0, 1], ScheduleConfig(stages=3))
    assert plan.n_steps == [3, 2]
    with pytest.raises(ValueError, match="step counts"):
        Schedule.from_dict({**schedule.to_dict(), "n_steps": []}).exposure()


def test_schedule_cli_passes_the_weight_rescaling(tiny_causal, tmp_path, monkeypatch) -> None:
    import kpod.weighting.weights as weighting_weights
    from kpod.cli import main

    data = tmp_path / "a.jsonl"
    assert main(["data", "synth", "arithmetic", "-n", "8", "--out", str(data)]) == 0
    calls = []
    monkeypatch.setattr(weighting_weights, "load_weights", lambda path, *rest: calls.append((path, *rest)))
    args = ["schedule", "plan", str(data), "--out", str(tmp_path / "p"), "--student", str(tiny_causal)]
    args += ["--epochs", "4", "--clusters", "2", "--weights", str(tmp_path / "w")]
    assert main(args + ["--rescale", "minmax", "--rescale-floor", "0.3"]) == 0
    assert calls == [(tmp_path / "w", "minmax", 0.3)]
    with pytest.raises(SystemExit):  # argparse: a floor outside [0, 1]
        main(args + ["--rescale", "minmax", "--rescale-floor", "1.5"])


def test_difficulty_scored_in_bf16_is_fp32_s_up_to_rounding(tiny_causal) -> None:
    """``difficulty.precision: bf16``: each step's difficulty within bf16 rounding of fp32's but
    not equal to it (the forward really ran in bf16), and the student's weights are float32 and
    unchanged afterwards."""
    import torch

    from kpod.data.synthetic import arithmetic_examples
    from kpod.models import load_model
    from kpod.progressive.difficulty import score_difficulties

    student = load_model(str(tiny_causal), trainable=False)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    examples = arithmetic_examples(4, seed=5)
    fp32 = score_difficulties(examples, student, None, batch_size=2, progress=False)
    bf16 = score_difficulties(examples, student, None, batch_size=2, progress=False, precision="bf16")
    assert fp32.keys() == bf16.keys()
    pairs = [(a, b) for k in fp32 for a, b in zip(fp32[k], bf16[k], strict=True)]
    assert all(b == pytest.approx(a, rel=2e-2) for a, b in pairs)
    assert any(a != b for a, b in pairs)
    for name, param in student.model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name


def test_seq2seq_difficulty_reads_the_prompt_in_the_encoder(tiny_seq2seq) -> None:
    import torch

    from kpod.data.synthetic import arithmetic_examples
    from kpod.models import load_model
    from kpod.progressive.difficulty import _tokenize, score_difficulties
    from kpod.prompt import PromptFormat
    from kpod.weighting.weights import rationale_key

    student = load_model(str(tiny_seq2seq), trainable=False)
    e = arithmetic_examples(1, seed=8)[0]
    diffs = score_difficulties([e], student, None, progress=False)[rationale_key(e)]
    assert len(diffs) == len(e.steps) and all(d > 0 for d in diffs)
    _, target, encoder_ids = _tokenize(e, PromptFormat(), student.tokenizer, "seq2seq")
    # The decoder text starts right after the prompt: its first step tokens decode to step 1.
    first = [i for i, s in zip(target.input_ids, target.segments, strict=True) if s == 0]
    assert student.tokenizer.decode(first).strip() == e.steps[0].text
    with torch.no_grad():
        logits = student.model(
            input_ids=torch.tensor([encoder_ids]), labels=torch.tensor([target.input_ids])
        ).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    pos = [p for p, s in enumerate(target.segments) if s == 1]
    expected = -float(sum(logp[p, target.input_ids[p]] for p in pos)) / len(pos)
    assert diffs[1] == pytest.approx(expected, rel=1e-4)


def test_questions_can_be_embedded_by_a_named_encoder(tiny_causal) -> None:
    from kpod.models import load_model
    from kpod.progressive.difficulty import cluster_questions, question_embeddings

    student = load_model(str(tiny_causal), trainable=False)
    questions = ["Ava has 3 apples.", "Ben has 40 coins and buys 2 more.", "How many cards?"]
    default = question_embeddings(questions, student)
    encoded = question_embeddings(questions, student, encoder=str(tiny_causal))
    assert default.shape == encoded.shape == (3, 32)
    assert not np.allclose(default, encoded)  # contextual hidden states, not input embeddings
    assert len(cluster_questions(encoded, 2)) == 3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_middle_stage_selects_nothing_while_its_budget_allows_a_step(seed: int) -> None:
    """Stages 1..T-1: if some question could move one step within what D(t) leaves after the
    previous stage, the stage advances at least one question."""
    diffs, clusters = random_problem(120, seed=seed)
    config = ScheduleConfig(stages=6, beta=12.0)
    sched = plan_schedule(diffs, clusters, config)
    for t in range(1, config.stages):
        remaining = sched.budget[t] - sched.achieved[t - 1]
        gains = [diffs[i][sched.c[i, t - 1] - 1] for i in range(len(diffs)) if sched.c[i, t - 1] > 0]
        if gains and min(gains) <= remaining + 1e-9:
            assert sched.advanced[t] > 0, (t, remaining, min(gains))


def test_stages_larger_than_epochs_are_refused_naming_both_keys(tmp_path) -> None:
    from kpod.distill.config import TrainConfig
    from kpod.errors import ConfigError
    from kpod.models import StudentConfig
    from kpod.pipeline import distill_student, pipeline_config
    from kpod.progressive.schedule import StageInputs

    with pytest.raises(ConfigError, match=r"schedule\.stages.*train\.epochs"):
        pipeline_config({"methods": ["kpod"], "schedule": {"stages": 5}, "train": {"epochs": 4}})
    assert pipeline_config({"methods": ["std-cot"], "schedule": {"stages": 5}, "train": {"epochs": 4}})
    assert pipeline_config({"train": {"epochs": 8}}).schedule.stages == 4  # T = epochs / 2 by default
    assert pipeline_config({"schedule": {"stages": 4}, "train": {"epochs": 4}}).schedule.stages == 4
    inputs = StageInputs({"a": [2, 1, 1, 0, 0, 0]})  # T = 5
    assert inputs.stages == 5
    with pytest.raises(ConfigError, match=r"T = 5.*train\.epochs = 4"):
        distill_student(
            TrainConfig(method="kpod", epochs=4),
            StudentConfig(name="never-loaded"),
            [],
            tmp_path,
            inputs=inputs,
        )
