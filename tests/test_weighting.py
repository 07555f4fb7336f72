import dataclasses
import math

import pytest
import torch

from kpod.data.synthetic import arithmetic_examples
from kpod.errors import ConfigError
from kpod.weighting.evaluate import keypoint_labels, keypoint_metrics, token_class_metrics
from kpod.weighting.maths import (
    align_weights,
    apply_mask,
    bernoulli_log_prob,
    binary_gumbel_mask,
    keypoint_objective,
    mask_ratio_loss,
    rescale_weights,
    score_function_surrogate,
)
from kpod.weighting.module import KeypointWeighter, WeighterShape
from kpod.weighting.train import (
    AnswerPredictor,
    WeightingConfig,
    _answer_losses,
    _encode,
    collapse_warning,
    load_weighting_model,
    train_weighting,
)
from kpod.weighting.visualise import html_heatmap, terminal_heatmap
from kpod.weighting.weights import load_weights, rationale_key


def test_gumbel_hard_samples_keep_with_probability_w() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97]).expand(20000, 5)
    for tau in (0.3, 1.0, 3.0):
        m = binary_gumbel_mask(w, tau=tau, hard=True, generator=g)
        assert torch.all((m - m.round()).abs() < 1e-6)  # hard 0/1 values (straight-through adds ~1e-8)
        freq = m.mean(0)
        # 4 standard errors of a Bernoulli mean over 20000 draws.
        tol = 4 * torch.sqrt(w[0] * (1 - w[0]) / 20000)
        assert torch.all((freq - w[0]).abs() < tol), (tau, freq)


def test_straight_through_gradient_reaches_w() -> None:
    w = torch.full((1000,), 0.5, requires_grad=True)
    m = binary_gumbel_mask(w, tau=1.0, hard=True, generator=torch.Generator().manual_seed(1))
    m.sum().backward()
    # d m / d w is positive on average: raising w raises the chance to keep.
    assert w.grad is not None and w.grad.mean() > 0


def test_apply_mask_and_losses_by_hand() -> None:
    e = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    keep = torch.tensor([[1.0, 0.0, 1.0]])
    mask_emb = torch.tensor([9.0, 9.0])
    assert apply_mask(e, keep, mask_emb).tolist() == [[[1, 2], [9, 9], [5, 6]]]
    valid = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    assert mask_ratio_loss(keep, valid).tolist() == [1.0]  # Eq. 6: a sum over valid tokens
    assert mask_ratio_loss(keep, valid, normalize=True).tolist() == [0.5]
    assert keypoint_objective(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == 3.5  # Eq. 7


def test_kept_budget_penalises_only_the_excess() -> None:
    valid = torch.ones(2, 4)
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = mask_ratio_loss(keep, valid, budget=0.5)
    assert loss.tolist() == pytest.approx([1.0, 0.0])  # 3 and 1 kept of 4 against a budget of 2
    loss.sum().backward()
    assert keep.grad is not None
    assert keep.grad[0].tolist() == pytest.approx([1.0] * 4)  # above the budget: Eq. 6's push
    assert keep.grad[1].tolist() == [0.0] * 4  # under the budget: no push towards masking
    assert mask_ratio_loss(keep, valid, normalize=True, budget=0.5).tolist() == pytest.approx([0.25, 0.0])


def test_score_function_estimate_is_unbiased_for_a_known_loss() -> None:
    # L(m) = sum_j c_j m_j, so d E[L] / d w_j = c_j exactly; the estimate must average to it.
    torch.manual_seed(0)
    c = torch.tensor([3.0, -2.0, 0.0, 1.0])
    w = torch.tensor([0.3, 0.6, 0.5, 0.8], requires_grad=True)
    valid = torch.ones(4)
    k, rounds = 4, 4000
    keeps = (torch.rand(rounds, k, 4) < w.detach()).float()  # [rounds, K, tokens]
    losses = (keeps * c).sum(-1)  # [rounds, K]
    log_probs = bernoulli_log_prob(keeps, w, valid)  # [rounds, K]
    surrogate = score_function_surrogate(losses.T, log_probs.T)  # rounds play the batch
    surrogate.mean().backward()
    assert w.grad is not None
    assert w.grad.tolist() == pytest.approx(c.tolist(), abs=0.25)
    # A loss that ignores the mask gives exactly no gradient (the baseline removes it).
    w.grad = None
    log_probs = bernoulli_log_prob(keeps, w, valid)
    score_function_surrogate(torch.full((k, rounds), 5.0), log_probs.T).mean().backward()
    assert w.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        score_function_surrogate(losses.T[:1], log_probs.T[:1])


def test_bernoulli_log_prob_by_hand() -> None:
    w = torch.tensor([[0.2, 0.9, 0.5]])
    keep = torch.tensor([[1.0, 0.0, 1.0]])
    valid = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    assert bernoulli_log_prob(keep, w, valid).item() == pytest.approx(math.log(0.2) + math.log(0.1))


def test_minmax_rescale_keeps_the_ranking_and_spans_floor_to_one() -> None:
    w = [0.97, 0.995, 0.98, 0.97]
    out = rescale_weights(w, "minmax", floor=0.2)
    assert out == pytest.approx([0.2, 1.0, 0.2 + 0.8 * 0.01 / 0.025, 0.2])
    assert rescale_weights(w, "none") == w
    assert rescale_weights([0.5, 0.5], "minmax") == [1.0, 1.0]  # nothing to rank: unweighted
    assert rescale_weights([], "minmax") == []
    with pytest.raises(ValueError):
        rescale_weights(w, "softmax")
    with pytest.raises(ConfigError):
        WeightingConfig(rescale="minmax", rescale_floor=1.5)


def test_collapse_warning_advises_only_what_the_config_has_not_tried() -> None:
    assert collapse_warning(0.5, WeightingConfig(target_keep=None)) is None
    assert collapse_warning(0.95, WeightingConfig(target_keep=None)) is None
    # the defaults already normalise L_m: near all-kept, advise alpha and the minmax rescale
    kept = collapse_warning(0.971, WeightingConfig(target_keep=None))
    assert kept is not None and "all-kept (mean w = 0.971)" in kept
    assert "larger alpha" in kept and "rescale: minmax" in kept and "normalize_mask_loss" not in kept
    kept_minmax = collapse_warning(
        0.99,
        WeightingConfig.from_settings(dict(rescale="minmax", normalize_mask_loss=False, target_keep=None)),
    )
    assert kept_minmax is not None and "rescale" not in kept_minmax
    assert "normalize_mask_loss: true" in kept_minmax
    masked = collapse_warning(0.01, WeightingConfig(target_keep=None))
    assert masked is not None and "all-masked" in masked
    assert "smaller alpha" in masked and "kept_budget" in masked
    assert "kept_budget" not in (
        collapse_warning(0.01, WeightingConfig.from_settings(dict(kept_budget=0.5, target_keep=None))) or ""
    )


def test_align_weights_by_offsets() -> None:
    # "Natalia sold 48" tokenized two ways.
    src = [(0, 7), (7, 12), (12, 15)]  # "Natalia", " sold", " 48"
    w = [0.2, 0.4, 0.9]
    dst = [(0, 3), (3, 7), (8, 12), (12, 13), (13, 15), (20, 21)]  # "Nat","alia","sold"," ","48", beyond
    assert align_weights(src, w, dst, default=1.0) == pytest.approx([0.2, 0.2, 0.4, 0.9, 0.9, 1.0])
    # A token straddling two source tokens takes the overlap-weighted mean.
    assert align_weights(src, w, [(5, 9)]) == [pytest.approx((2 * 0.2 + 2 * 0.4) / 4)]


def _tiny_weighter(vocab: int = 50, hidden: int = 8) -> KeypointWeighter:
    torch.manual_seed(0)
    return KeypointWeighter(
        WeighterShape(vocab, hidden, num_heads=2, mlp_hidden=16), torch.randn(vocab, hidden)
    )


def test_answer_loss_gradient_reaches_the_mlp_only_through_the_mask() -> None:
    weighter = _tiny_weighter()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    target = torch.randn(8)

    def answer_loss(cut: bool) -> torch.Tensor:
        weighter.zero_grad()
        w = weighter(ids, mask)
        keep = binary_gumbel_mask(w, generator=torch.Generator().manual_seed(0))
        if cut:
            keep = keep.detach()  # what swapping token ids does
        masked = apply_mask(weighter.embeddings(ids), keep, weighter.mask_embedding)
        return ((masked.mean(1) - target) ** 2).sum()  # a stand-in predictor: needs the kept tokens

    answer_loss(cut=False).backward()
    assert weighter.mlp[0].weight.grad is not None and weighter.mlp[0].weight.grad.abs().sum() > 0
    assert weighter.attention.in_proj_weight.grad.abs().sum() > 0
    assert weighter.embed.weight.grad is None  # the student's embeddings stay frozen
    answer_loss(cut=True).backward()
    assert weighter.mlp[0].weight.grad is None or weighter.mlp[0].weight.grad.abs().sum() == 0


def test_padding_gets_zero_weight() -> None:
    weighter = _tiny_weighter()
    ids = torch.randint(0, 50, (1, 5))
    w = weighter(ids, torch.tensor([[1, 1, 1, 0, 0]]))
    assert torch.all(w[0, 3:] == 0) and torch.all(w[0, :3] > 0)


def test_keypoint_labels_follow_offsets() -> None:
    e = arithmetic_examples(1, seed=3)[0]
    k = e.keypoints[0]
    offsets = [[k.start - 1, k.end], [0, 3], [k.end, k.end + 1]]  # " 12", "Let", a following char
    labels = keypoint_labels(e, offsets)
    assert labels[0] == 1 and labels[1] == 0


def _tiny_config(student, **settings) -> WeightingConfig:
    """A small module on the tiny test student, in fp32; the paper's objective (no kept-ratio
    budget) unless ``target_keep`` is given."""
    settings.setdefault("target_keep", None)
    return WeightingConfig.from_settings(
        dict(student=str(student), num_heads=2, mlp_hidden=16, precision="fp32", **settings)
    )


def test_training_on_the_tiny_model_learns_and_saves(tiny_causal, tmp_path) -> None:
    examples = arithmetic_examples(24, seed=5)
    config = _tiny_config(tiny_causal, epochs=2, batch_size=8, n_prefixes=2, alpha=0.5)
    model, history = train_weighting(examples, config, out_dir=tmp_path / "w", progress=False)
    assert len(history) == 6
    assert all(math.isfinite(h["loss"]) and 0 < h["kept_ratio"] < 1 for h in history)
    # The sparsity term pushes the kept ratio down from its start (about 0.73).
    assert history[-1]["kept_ratio"] < history[0]["kept_ratio"]
    rows = load_weights(tmp_path / "w")
    assert set(rows) == {rationale_key(e) for e in examples}
    row = rows[rationale_key(examples[0])]
    assert len(row.offsets) == len(row.weights)
    assert all(examples[0].rationale[s:e] for s, e in row.offsets)
    rescaled = load_weights(tmp_path / "w", "minmax", 0.1)[rationale_key(examples[0])].weights
    assert min(rescaled) == pytest.approx(0.1) and max(rescaled) == pytest.approx(1.0)
    order = sorted(range(len(row.weights)), key=row.weights.__getitem__)
    assert [rescaled[i] for i in order] == sorted(rescaled)  # the learned ranking is kept
    again = load_weighting_model(tmp_path / "w").weigh(examples[:1])[0]
    assert again.weights == pytest.approx(row.weights, abs=1e-4)
    metrics = keypoint_metrics(examples, rows)
    assert 0 <= metrics["auc"] <= 1 and metrics["n_keypoint_tokens"] > 0
    classes = token_class_metrics(examples, rows)
    assert classes["n_digit_operator_tokens"] > 0
    assert "\x1b[48;5;" in terminal_heatmap(examples[0], row)
    page = html_heatmap(examples[:2], rows)
    assert page.count('class="ex"') == 2 and "w = " in page


def test_prefix_sum_scales_the_sampled_prefixes(tiny_causal) -> None:
    examples = arithmetic_examples(8, seed=6)
    _, plain = train_weighting(examples, _tiny_config(tiny_causal, epochs=1, batch_size=8), progress=False)
    summed_config = _tiny_config(tiny_causal, epochs=1, batch_size=8, prefix_sum=True)
    _, summed = train_weighting(examples, summed_config, progress=False)
    # Same seed, same samples: the shorter prefix's NLL is multiplied by the rationale's length.
    assert summed[0]["mask_loss"] == plain[0]["mask_loss"]
    assert summed[0]["answer_loss"] > 20 * plain[0]["answer_loss"] / 2


def test_max_steps_stops_training_early(tiny_causal) -> None:
    examples = arithmetic_examples(16, seed=7)
    _, full = train_weighting(examples, _tiny_config(tiny_causal, epochs=2, batch_size=4), progress=False)
    short_config = _tiny_config(tiny_causal, epochs=2, batch_size=4, max_steps=3)
    _, short = train_weighting(examples, short_config, progress=False)
    assert len(full) == 8 and len(short) == 3
    with pytest.raises(ConfigError, match="max_steps"):
        WeightingConfig(max_steps=0)


def test_score_function_training_moves_the_module_but_not_the_mask_embedding(tiny_causal) -> None:
    examples = arithmetic_examples(8, seed=8)
    config = _tiny_config(tiny_causal, batch_size=4, estimator="score-function", samples=3)
    before, _ = train_weighting(examples, dataclasses.replace(config, max_steps=1, lr=0.0), progress=False)
    seen: list[int] = []
    model, history = train_weighting(examples, config, progress=False, on_step=lambda s, m: seen.append(s))
    assert seen == [1, 2] and len(history) == 2
    assert all(math.isfinite(h["loss"]) and h["answer_loss"] > 0 for h in history)
    moved = model.weighter.mlp[0].weight - before.weighter.mlp[0].weight
    assert moved.abs().max().item() > 0
    assert torch.equal(model.weighter.mask_embedding, before.weighter.mask_embedding)
    with pytest.raises(ConfigError, match="samples"):
        WeightingConfig.from_settings(dict(estimator="score-function", samples=1))


def test_length_sorted_chunks_give_the_same_answer_losses_and_gradients(tiny_causal) -> None:
    import random

    from kpod.models import load_model

    loaded = load_model(str(tiny_causal), trainable=False)
    predictor = AnswerPredictor(loaded, loaded.model.get_input_embeddings().weight.shape[1])
    batch = _encode(arithmetic_examples(5, seed=3), loaded.tokenizer, loaded.tokenizer, 256)
    rng = random.Random(0)
    prefixes = [[(len(b.rationale_ids), 1.0), (rng.randrange(len(b.rationale_ids)), 1.0)] for b in batch]
    longest = max(len(b.rationale_ids) for b in batch)
    emb = loaded.model.get_input_embeddings()
    hidden = emb.weight.shape[1]

    def losses(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)
        versions = [torch.randn(len(batch), longest, hidden, requires_grad=True) for _ in range(3)]
        out = _answer_losses(predictor, batch, versions, prefixes, chunk=chunk)
        out.sum().backward()
        return out.detach(), versions[1].grad

    whole, whole_grad = losses(chunk=10_000)  # one padded batch
    chunked, chunked_grad = losses(chunk=4)
    assert whole.shape == (3, 5)
    assert torch.allclose(chunked, whole, atol=1e-4)
    assert torch.allclose(chunked_grad, whole_grad, atol=1e-5)
    # Oracle: each (version, example) scored alone, one sequence per predictor call, summed over
    # its prefixes; catches losses put back in the wrong order after sorting.
    torch.manual_seed(1)
    versions = [torch.randn(len(batch), longest, hidden) for _ in range(3)]
    with torch.no_grad():
        for v, version in enumerate(versions):
            for i, b in enumerate(batch):
                alone = sum(
                    predictor.answer_nll([b.question_ids], [version[i, :k]], [b.answer_ids], [b.n_scored])
                    for k, _ in prefixes[i]
                )
                assert float(alone) == pytest.approx(float(whole[v, i]), abs=1e-4)


def test_weights_stay_fp32_under_bf16_autocast() -> None:
    """Near 1, bf16 can only say 0.996, 1.0: the module's w must keep its fp32 resolution."""
    weighter = _tiny_weighter()
    with torch.no_grad():
        weighter.mlp[-1].bias.fill_(6.0)  # w around 0.9975, where bf16 steps are 0.004 apart
    ids = torch.randint(0, 50, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = weighter(ids, mask)
    assert w.dtype == torch.float32
    assert len(set(w.flatten().tolist())) > 20  # bf16 would give two or three distinct values
    assert float(w.min()) > 0.99


def test_budget_weights_hold_each_rationale_at_its_target_and_keep_the_order() -> None:
    from kpod.weighting.maths import budget_weights

    torch.manual_seed(0)
    logits = torch.randn(3, 9) * 2 + torch.tensor([[3.0], [-4.0], [0.0]])  # all-kept, all-masked, mixed
    valid = torch.ones(3, 9)
    valid[2, 6:] = 0  # a shorter rationale
    w = budget_weights(logits, valid, 0.4)
    means = (w * valid).sum(-1) / valid.sum(-1)
    assert means.tolist() == pytest.approx([0.4, 0.4, 0.4], abs=1e-4)
    assert (w[2, 6:] == 0).all()
    for i in range(3):  # a shift: the order of the logits is the order of the weights
        n = int(valid[i].sum())
        assert torch.argsort(w[i, :n]).tolist() == torch.argsort(logits[i, :n]).tolist()
    # the gradient reaches the logits (the shift is a constant of each step)
    s = logits.clone().requires_grad_(True)
    (budget_weights(s, valid, 0.4) * torch.arange(9.0)).sum().backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_a_target_keep_ratio_holds_the_weights_at_it(tiny_causal, tmp_path) -> None:
    """With target_keep 0.3 every rationale's saved weights average 0.3 (the module chooses only
    which tokens), and the sparsity term is off; without it they average what the module learnt."""
    examples = arithmetic_examples(24, seed=5)
    config = _tiny_config(tiny_causal, epochs=2, lr=1e-2, target_keep=0.3)
    _, held = train_weighting(examples, config, out_dir=tmp_path / "w", progress=False)
    assert all(h["sparsity"] == 0.0 for h in held)
    assert all(h["kept_ratio"] == pytest.approx(0.3, abs=1e-3) for h in held)
    rows = load_weights(tmp_path / "w")
    for row in rows.values():
        assert sum(row.weights) / len(row.weights) == pytest.approx(0.3, abs=2e-3)
        assert max(row.weights) - min(row.weights) > 1e-3  # not one constant
    plain = train_weighting(examples, _tiny_config(tiny_causal, epochs=2, lr=1e-2), progress=False)[1]
    assert plain[-1]["kept_ratio"] != pytest.approx(0.3, abs=0.02) and plain[0]["sparsity"] == 0.5
    with pytest.raises(ConfigError):
        WeightingConfig(target_keep=1.0)
    assert WeightingConfig().target_keep == 0.5  # the default (README: where we depart)
    assert collapse_warning(0.5, WeightingConfig()) is None


def test_questions_read_once_give_the_same_answer_losses(tiny_causal) -> None:
    """The shared-question path (each question read once into a key/value cache that its masked
    rationales continue) against one padded row per sequence, in fp32: questions of different
    lengths (left padding in the cache), an empty prefix, prefix scales, uneven groups."""
    import random

    from kpod.models import load_model

    loaded = load_model(str(tiny_causal), trainable=False)
    predictor = AnswerPredictor(loaded, loaded.model.get_input_embeddings().weight.shape[1])
    batch = _encode(arithmetic_examples(5, seed=3), loaded.tokenizer, loaded.tokenizer, 256)
    batch[1].question_ids = batch[1].question_ids * 3  # a much longer question
    rng = random.Random(0)
    prefixes = [[(len(b.rationale_ids), 1.0), (rng.randrange(len(b.rationale_ids)), 2.5)] for b in batch]
    prefixes[2][1] = (0, 2.5)  # the answer straight after the question
    longest = max(len(b.rationale_ids) for b in batch)
    torch.manual_seed(1)
    hidden = loaded.model.get_input_embeddings().weight.shape[1]
    versions = [torch.randn(len(batch), longest, hidden) for _ in range(3)]
    with torch.no_grad():
        assert predictor.shares_questions()
        rows = _answer_losses(predictor, batch, versions, prefixes, share_questions=False)
        for chunk in (6, 16, 10_000):  # one example per call, two, all five
            shared = _answer_losses(predictor, batch, versions, prefixes, chunk=chunk)
            assert torch.allclose(shared, rows, rtol=1e-5, atol=1e-5), (chunk, shared - rows)
    assert not predictor.shares_questions()  # gradients wanted: one row per sequence


def test_bf16_training_stores_the_frozen_predictor_in_bf16_with_the_same_history(tiny_causal, monkeypatch):
    """Under bf16 on a CPU the loop holds the frozen predictor's weights in bf16 (autocast would
    cast them at every forward pass); the rounding is the same, so the history is too."""
    import contextlib

    import kpod.models as models

    examples = arithmetic_examples(16, seed=5)
    config = dataclasses.replace(_tiny_config(tiny_causal, batch_size=8, target_keep=0.5), precision="bf16")
    seen = []
    real = models.frozen_linears_in

    @contextlib.contextmanager
    def spy(model, dtype):
        with real(model, dtype) as n:
            seen.append(n)
            yield n

    monkeypatch.setattr(models, "frozen_linears_in", spy)
    _, stored = train_weighting(examples, config, progress=False)
    assert seen and seen[0] > 0  # the predictor's projections were converted
    monkeypatch.setattr(models, "frozen_linears_in", lambda model, dtype: contextlib.nullcontext(0))
    _, cast = train_weighting(examples, config, progress=False)
    assert stored == cast
