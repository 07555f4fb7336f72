"""The paper's baselines in the one loop: several rationales per question, SCoTD, MCC-KD."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from kpod.data.loaders import make_example
from kpod.data.splits import choose_rationales, rationale_is_correct
from kpod.distill.methods import StageBuilder, StudentShape, get_method
from kpod.distill.methods.mcc_kd import PairExample
from kpod.models import load_model
from kpod.prompt import render_example


def _example(qid: str, rationale: str, answer: str = "7", question: str = "What is 3 + 4?"):
    return make_example(qid=qid, question=question, rationale=rationale, answer=answer)


def _several() -> list:
    """Question a: three rationales, one of them wrong; question b: one rationale."""
    return [
        _example("a", "We add 3 and 4.\n3 + 4 = 7."),
        _example("a", "Three plus four.\nThat makes 9."),  # ends on the wrong number
        _example("a", "Start from 3.\nCount on 4 to reach 7."),
        _example("a", "Take 4.\nAdd 3 to get 7."),
        _example("b", "Double 5.\n5 * 2 = 10.", answer="10", question="What is 5 times 2?"),
    ]


def test_rationales_per_question_are_drawn_by_seed_among_the_correct_ones():
    examples = _several()
    assert [rationale_is_correct(e) for e in examples] == [True, False, True, True, True]
    one = choose_rationales(examples, 1, seed=0)
    assert Counter(e.qid for e in one) == {"a": 1, "b": 1}
    assert all(rationale_is_correct(e) for e in one)
    assert choose_rationales(examples, 1, seed=0) == one  # deterministic
    drawn = {choose_rationales(examples, 1, seed=s)[0].rationale for s in range(40)}
    assert drawn == {examples[i].rationale for i in (0, 2, 3)}  # every correct one, never the wrong one
    two = choose_rationales(examples, 2, seed=3)
    assert [e.qid for e in two] == ["a", "a", "b"]
    assert [examples.index(e) for e in two] == sorted(examples.index(e) for e in two)  # file order kept
    assert choose_rationales(examples, None) == examples


def test_rationales_per_question_is_validated_and_reported(tmp_path):
    from kpod.data.loaders import LoadReport
    from kpod.data.stats import compute_stats, format_stats
    from kpod.errors import ConfigError
    from kpod.pipeline import pipeline_config

    with pytest.raises(ConfigError, match="rationales_per_question must be at least 1"):
        pipeline_config({"data": {"rationales_per_question": 0}})
    stats = compute_stats(_several(), LoadReport(source="test"))
    assert stats["rationales_per_question"]["max"] == 4 and stats["rationales_per_question"]["mean"] == 2.5
    assert "rationales/q.      mean 2.5, max 4" in format_stats(stats)


def test_scotd_draws_every_correct_rationale_uniformly_and_never_a_wrong_one(tiny_causal):
    tok = load_model(str(tiny_causal), trainable=False).tokenizer
    examples = _several()
    builder = StageBuilder(get_method("scotd"), examples, tok, seed=5)
    texts = {}
    for i in range(len(examples)):
        texts[tuple(builder.target(i, 0, weighted=False).input_ids)] = i
    counts: Counter = Counter()
    stages = 600
    for stage in range(1, stages + 1):
        batch = builder.stage(stage)
        assert len(batch) == 2  # one rationale per question per epoch
        counts.update(texts[tuple(x.input_ids)] for x in batch)
    assert counts[4] == stages and counts[1] == 0
    for i in (0, 2, 3):  # 1/3 each: 200 expected, 3 sigma is about 35
        assert abs(counts[i] - stages / 3) < 35, counts
    # A new draw each epoch, fixed by the seed.
    assert builder.stage(1) == StageBuilder(get_method("scotd"), examples, tok, seed=5).stage(1)
    assert len({tuple(builder.stage(t)[0].input_ids) for t in range(1, 10)}) > 1


def _pair_batch(model_path, rationales, alpha=0.5):
    student = load_model(str(model_path))
    examples = [_example("q", r) for r in rationales]
    method = get_method("mcc-kd")
    builder = StageBuilder(method, examples, student.tokenizer, mcc_alpha=alpha)
    (pair,) = builder.stage(1)
    assert isinstance(pair, PairExample)
    pad = student.tokenizer.pad_token_id
    batch = method.collate([pair], pad, "causal")
    return student, method, pair, batch, examples


def _by_hand(model, tokenizer, example) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Summed NLL of the rendered rationale + answer (targets from the first step on), the
    full logits, and the token ids of the answer sentence, from one plain forward pass."""
    rendered = render_example(example, tokenizer=tokenizer)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    logits = model(input_ids=ids).logits[0].float()
    offsets = enc["offset_mapping"]
    # A token belongs to the piece holding its last character (whitespace goes with what follows).
    targets = [p for p, (s, e) in enumerate(offsets) if e - 1 >= rendered.prompt.end and p > 0]
    nll = sum(F.cross_entropy(logits[p - 1 : p], ids[0, p : p + 1], reduction="sum") for p in targets)
    last_step = rendered.steps[-1].end
    answer = [p for p, (s, e) in enumerate(offsets) if e > s and last_step <= e - 1 < rendered.answer.end]
    return nll, logits, answer


def test_mcc_kd_consistency_term_recomputed_by_hand(tiny_causal):
    student, method, pair, batch, examples = _pair_batch(
        tiny_causal, ["We add 3 and 4.\n3 + 4 = 7.", "Start from 3.\nCount on 4 to reach 7."]
    )
    model, tok = student.model.eval(), student.tokenizer
    for from_hidden in (False, True):
        shape = StudentShape("causal", tok.pad_token_id, tok.pad_token_id, from_hidden=from_hidden)
        got = method.loss(model, batch, shape)
        nll_a, logits_a, ans_a = _by_hand(model, tok, examples[batch_order(pair, examples, tok)[0]])
        nll_b, logits_b, ans_b = _by_hand(model, tok, examples[batch_order(pair, examples, tok)[1]])
        assert len(ans_a) == len(ans_b) > 3
        p = torch.log_softmax(logits_a[[i - 1 for i in ans_a]], -1)
        q = torch.log_softmax(logits_b[[i - 1 for i in ans_b]], -1)
        kl = (
            F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
            + F.kl_div(p, q, log_target=True, reduction="none").sum(-1)
        ) / 2
        n_targets = (float(batch_targets(batch, 0)) + float(batch_targets(batch, 1))) / 2
        expected = (nll_a + nll_b) / 2 + 0.5 * n_targets * kl.mean()
        assert got.item() == pytest.approx(expected.item(), rel=1e-4)
        # The consistency term alone (the NLL's weights zeroed), small on a random model: to 1e-3.
        only_kl = method.loss(model, dict(batch, weights=torch.zeros_like(batch["weights"])), shape)
        assert only_kl.item() == pytest.approx(0.5 * n_targets * kl.mean().item(), rel=1e-3)
        assert only_kl.item() > 1e-4


def batch_order(pair, examples, tok):
    """Which examples are the pair's first and second rows."""

    def ids(e):
        rendered = render_example(e, tokenizer=tok)
        return tok(rendered.text, add_special_tokens=False)["input_ids"]

    first = next(i for i, e in enumerate(examples) if ids(e) == list(pair.input_ids))
    return first, 1 - first


def batch_targets(batch, row):
    return (batch["labels"][row, 1:] != -100).sum()


def test_mcc_kd_term_is_zero_for_identical_rationales_and_reaches_both_branches(tiny_causal):
    same = "We add 3 and 4.\n3 + 4 = 7."
    student, method, pair, batch, _ = _pair_batch(tiny_causal, [same, same])
    model, tok = student.model.eval(), student.tokenizer
    shape = StudentShape("causal", tok.pad_token_id, tok.pad_token_id, from_hidden=True)
    only_kl = dict(batch, weights=torch.zeros_like(batch["weights"]))
    assert method.loss(model, only_kl, shape).item() == pytest.approx(0.0, abs=1e-6)
    # Two different rationales: the term alone moves the states of both rows.
    student, method, pair, batch, _ = _pair_batch(
        tiny_causal, [same, "Start from 3.\nCount on 4 to reach 7."]
    )
    model = student.model.eval()
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["emb"] = out

    hook = model.get_input_embeddings().register_forward_hook(keep)
    try:
        loss = method.loss(model, dict(batch, weights=torch.zeros_like(batch["weights"])), shape)
        loss.backward()
    finally:
        hook.remove()
    grad = captured["emb"].grad
    assert loss.item() > 0
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0  # both branches get a gradient


def test_mcc_kd_pairs_a_question_with_one_rationale_with_nothing(tiny_causal):
    tok = load_model(str(tiny_causal), trainable=False).tokenizer
    builder = StageBuilder(get_method("mcc-kd"), _several(), tok)
    stage = builder.stage(1)
    assert [type(x).__name__ for x in stage] == ["PairExample", "StageExample"]
    pair = stage[0]
    assert (
        pair.n_targets
        == (sum(x != -100 for x in pair.labels) + sum(x != -100 for x in pair.partner.labels)) / 2
    )
    assert all(abs(w - 0.5) < 1e-9 for w in pair.weights)  # each rationale counts half


def test_kpod_on_several_rationales_plans_each_rationale_on_its_own(tiny_causal):
    """The schedule is per rationale: two rationales of one question, of 2 and 4 steps and of
    different difficulty, get their own c_i(t), each within its own steps."""
    from kpod.progressive.schedule import ScheduleConfig, StageInputs, plan_schedule
    from kpod.weighting.weights import rationale_key

    short = _example("a", "We add 3 and 4.\n3 + 4 = 7.")
    long = _example("a", "Start from 3.\nCount on 1.\nCount on 2 more.\nCount on 1 again to reach 7.")
    other = _example("b", "Double 5.\nHalve 10.\nDouble 5 to get 10.", answer="10", question="5 times 2?")
    examples = [short, long, other]
    assert len({rationale_key(e) for e in examples}) == 3 and short.qid == long.qid
    plan = plan_schedule(
        [[1.0, 1.0], [0.5, 3.0, 0.5, 2.0], [1.0, 1.0, 1.0]], [0, 0, 1], ScheduleConfig(stages=3)
    )
    inputs = StageInputs.of({rationale_key(e): plan.c[i].tolist() for i, e in enumerate(examples)})
    tok = load_model(str(tiny_causal), trainable=False).tokenizer
    weights = {}
    from kpod.weighting.weights import TokenWeights

    for e in examples:
        enc = tok(e.rationale, add_special_tokens=False, return_offsets_mapping=True)
        weights[rationale_key(e)] = TokenWeights(
            rationale_key(e), e.qid, enc["offset_mapping"], [0.5] * len(enc["input_ids"])
        )
    builder = StageBuilder(get_method("kpod"), examples, tok, weights=weights, inputs=inputs)
    rows = [[builder.n_input_steps(i, t) for t in range(4)] for i in range(3)]
    assert rows[0] != rows[1]  # one question, two schedules
    assert max(rows[0]) <= 2 and max(rows[1]) <= 4 and rows[1][0] > 2  # each within its own steps
    assert [r[3] for r in rows] == [0, 0, 0]  # whole rationales at stage T
    assert len(builder.stage(1)) == 3  # every rationale is trained on, as with std-cot
