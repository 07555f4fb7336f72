import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kpod.data.loaders import make_example
from kpod.distill.loss import IGNORE, count_targets, shift_for_causal_lm, weighted_token_nll
from kpod.distill.stages import build_stage_example
from kpod.models import load_tokenizer
from kpod.weighting.weights import TokenWeights

EXAMPLE = make_example(
    qid="q1",
    question="Natalia sold 48 clips in April and half as many in May. How many in all?",
    rationale="Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\nSo 72 in all.",
    answer="72",
)


def test_unit_weights_give_the_standard_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE)
    got = weighted_token_nll(logits, labels, torch.ones(3, 7), count_targets(labels, causal=False))
    # Equal up to float32 summation order (the reductions add in different orders).
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weights_scale_each_token_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    labels = torch.tensor([[0, 1]])
    weights = torch.tensor([[0.2, 1.0]])
    expected = (0.2 * -torch.log(torch.tensor(0.5)) + 1.0 * -torch.log(torch.tensor(0.75))) / 2
    assert weighted_token_nll(logits, labels, weights, 2).item() == pytest.approx(expected.item())


def test_micro_batches_give_the_full_batch_gradient() -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(5, 9)
    x = torch.randn(6, 4, 5)
    labels = torch.randint(0, 9, (6, 4))
    labels[1, 2:] = IGNORE
    labels[4, :] = IGNORE
    weights = torch.rand(6, 4)

    def grad(chunks: list[slice]) -> torch.Tensor:
        layer.zero_grad()
        total = sum(count_targets(labels[c], causal=True) for c in chunks)  # the whole step's count
        for c in chunks:
            logits, lab, w = shift_for_causal_lm(layer(x[c]), labels[c], weights[c])
            weighted_token_nll(logits, lab, w, total).backward()
        return layer.weight.grad.clone()

    full = grad([slice(0, 6)])
    assert torch.allclose(full, grad([slice(0, 2), slice(2, 3), slice(3, 6)]), atol=1e-6)
    assert torch.allclose(full, grad([slice(i, i + 1) for i in range(6)]), atol=1e-6)


def test_causal_stage_examples_label_only_the_target_steps(tiny_causal) -> None:
    tok = load_tokenizer(str(tiny_causal))
    n = len(EXAMPLE.steps)
    for c in range(n + 1):
        ex = build_stage_example(EXAMPLE, c, tok)
        target = tok.decode([t for t in ex.labels if t != IGNORE])
        tail = " ".join(s.text for s in EXAMPLE.steps[c:])
        expected = (f"{tail} " if tail else "") + "Therefore, the answer is 72." + tok.eos_token
        assert " ".join(target.split()) == " ".join(expected.split()), c
        assert ex.n_input_steps == c
    assert build_stage_example(EXAMPLE, 99, tok).n_input_steps == n


def test_weights_are_resliced_onto_target_rationale_tokens(tiny_causal) -> None:
    tok = load_tokenizer(str(tiny_causal))
    enc = tok(EXAMPLE.rationale, add_special_tokens=False, return_offsets_mapping=True)
    row = TokenWeights("k", EXAMPLE.qid, enc["offset_mapping"], [0.3] * len(enc["input_ids"]))
    ex = build_stage_example(EXAMPLE, 1, tok, weights_row=row)
    labelled = [(t, w) for t, w in zip(ex.labels, ex.weights, strict=True) if t != IGNORE]
    rationale_part = tok.decode([t for t, w in labelled if w == pytest.approx(0.3)])
    answer_part = tok.decode([t for t, w in labelled if w == 1.0])
    assert "48+24 = 72" in rationale_part and "Therefore" not in rationale_part
    assert answer_part.strip().startswith("Therefore, the answer is 72.")


def test_seq2seq_stage_examples_split_encoder_and_decoder(tiny_seq2seq) -> None:
    tok = load_tokenizer(str(tiny_seq2seq))
    ex = build_stage_example(EXAMPLE, 2, tok, kind="seq2seq")
    encoder_text = tok.decode(ex.input_ids, skip_special_tokens=True)
    decoder_text = tok.decode(ex.labels, skip_special_tokens=True)
    assert encoder_text.endswith("Natalia sold 48+24 = 72 clips.")
    assert decoder_text.strip() == "So 72 in all. Therefore, the answer is 72."
    assert all(label != IGNORE for label in ex.labels)  # the model shifts them itself


def test_each_target_token_carries_its_own_weight(tiny_causal) -> None:
    """Weights that differ token by token (a ramp) land on exactly the token they belong to:
    reversing, shifting or permuting them within a step or the rationale fails this test."""
    tok = load_tokenizer(str(tiny_causal))
    enc = tok(EXAMPLE.rationale, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ramp = [round(0.05 + 0.9 * i / max(1, len(offsets) - 1), 4) for i in range(len(offsets))]
    for c in (0, 1):
        ex = build_stage_example(EXAMPLE, c, tok, weights_row=TokenWeights("k", "q", offsets, ramp))
        input_end = EXAMPLE.steps[c - 1].end if c else 0  # the gap after the input goes with the target
        expected = [w for (s, e), w in zip(offsets, ramp, strict=True) if s >= input_end]
        got = [w for t, w in zip(ex.labels, ex.weights, strict=True) if t != IGNORE and w != 1.0]
        assert got == pytest.approx(expected), c  # in order, one per rationale token, none missing
    assert ramp != sorted(ramp, reverse=True)  # the inputs would expose a reversal


def _loss_and_grads(model, batch, kind, from_hidden, chunk=3, precision="fp32"):
    from kpod.distill.loss import sequence_nll
    from kpod.models import autocast

    model.zero_grad(set_to_none=True)
    with autocast("cpu", precision):
        loss = sequence_nll(model, batch, kind, 0, 0, from_hidden=from_hidden, chunk=chunk)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_loss_from_hidden_states_equals_the_loss_from_logits(kind, finetune, tiny_causal, tiny_seq2seq):
    """Today's loss and gradients, to 1e-5 in fp32, with weights that differ at every token and
    chunks that cut through the labelled positions; the full logits are never asked for."""
    from kpod.chunked_loss import head_bypass_supported
    from kpod.distill.batches import collate
    from kpod.models import StudentConfig

    path = tiny_causal if kind == "causal" else tiny_seq2seq
    torch.manual_seed(0)
    student = StudentConfig(
        name=str(path), finetune=finetune, lora_r=4, lora_alpha=8, lora_dropout=0.0
    ).load()
    model = student.model
    assert head_bypass_supported(model)
    tokenizer = student.tokenizer
    examples = []
    for k, steps in enumerate([0, 1, 2]):
        ex = build_stage_example(EXAMPLE, steps, tokenizer, kind=kind)
        weights = [0.1 + 0.9 * ((j * 7 + k) % 11) / 10 for j in range(len(ex.labels))]
        examples.append(dataclasses.replace(ex, weights=weights))
    batch = collate(examples, tokenizer.pad_token_id, kind)
    model.eval()  # the T5's dropout would draw different masks on the two passes
    old_loss, old_grads = _loss_and_grads(model, batch, kind, from_hidden=False)
    new_loss, new_grads = _loss_and_grads(model, batch, kind, from_hidden=True)
    assert new_loss.item() == pytest.approx(old_loss.item(), rel=1e-5)
    assert old_grads.keys() == new_grads.keys() and old_grads
    for name, grad in old_grads.items():
        # The loss is a sum over tokens (~500 here), so gradients reach ~10 and fp32 rounding ~3e-6 in
        # elements near 0 (seen on an AMD EPYC): the absolute tolerance scales with the tensor's largest
        # element, 1e-6 of it; a wrong weight or position moves a gradient by a share of that largest.
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # Reversing the weights within each example changes the loss: the weights reach it per token.
    flipped = dict(batch, weights=batch["weights"].flip(-1))
    flipped_loss, _ = _loss_and_grads(model, flipped, kind, from_hidden=True)
    assert abs(flipped_loss.item() - new_loss.item()) > 1e-3 * abs(new_loss.item())
    # Under bf16 autocast both paths project in bf16: the same loss up to bf16 rounding.
    old_bf16, _ = _loss_and_grads(model, batch, kind, from_hidden=False, precision="bf16")
    new_bf16, _ = _loss_and_grads(model, batch, kind, from_hidden=True, precision="bf16")
    assert new_bf16.item() == pytest.approx(old_bf16.item(), rel=2e-3)
    # The model's own output projection is back in place afterwards.
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"][:1, :4],
            attention_mask=batch["attention_mask"][:1, :4],
            **({} if kind == "causal" else {"decoder_input_ids": batch["labels"][:1, :1].clamp(min=0)}),
        ).logits
    assert logits.shape[-1] == model.get_output_embeddings().weight.shape[0]


def test_weighted_linear_nll_matches_cross_entropy_by_hand() -> None:
    from kpod.chunked_loss import weighted_linear_nll

    torch.manual_seed(3)
    hidden = torch.randn(10, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    labels = torch.randint(0, 13, (10,))
    tw = torch.rand(10)
    expected = (F.cross_entropy(hidden @ weight.T, labels, reduction="none") * tw).sum()
    gh, gw = torch.autograd.grad(expected * 2.5, [hidden, weight])
    for chunk in (1, 4, 10, 64):
        got = weighted_linear_nll(hidden, weight, labels, tw, chunk)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        nh, nw = torch.autograd.grad(got * 2.5, [hidden, weight])  # the upstream factor reaches both
        torch.testing.assert_close(nh, gh)
        torch.testing.assert_close(nw, gw)


def _fused_weighted_nll(hidden, weight, labels, tw, chunk, dtype):
    """The chunked loss and its gradients as kpod computed them before its logit buffers: fresh
    tensors per chunk and ``log_softmax(..., dtype=float32)`` fused."""
    w = weight.to(dtype)
    total, grad_h, grad_w = torch.zeros(()), torch.empty_like(hidden), torch.zeros(weight.shape)
    for start in range(0, len(hidden), chunk):
        h, y, t = (
            hidden[start : start + chunk].to(dtype),
            labels[start : start + chunk],
            tw[start : start + chunk],
        )
        logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
        total += (-logp.gather(1, y[:, None]).squeeze(1) * t).sum()
        g = logp.exp_()
        g[torch.arange(len(y)), y] -= 1
        g = g.to(dtype)
        grad_h[start : start + chunk] = (g @ w).to(hidden.dtype) * t[:, None]
        grad_w += (g.T @ (h * t[:, None].to(dtype))).float()
    return total, grad_h, grad_w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logit_buffers_give_the_fused_losses_bits_and_are_kept_only_inside_their_block(dtype) -> None:
    """The CPU's logit buffers (kpod.chunked_loss.LogitBuffers) change no bit of the loss, its
    gradients or the scoring's log-probabilities against the former fused path, for chunks of
    several sizes (a shorter last one) and a second call on other inputs in the kept buffers; inside
    kept_logit_buffers a second call reuses the first's buffer, outside nothing is kept."""
    from kpod.chunked_loss import (
        LOGIT_BUFFERS,
        kept_logit_buffers,
        linear_token_logprobs,
        weighted_linear_nll,
    )

    torch.manual_seed(4)
    vocab, d = 300, 24
    weight = torch.randn(vocab, d, requires_grad=True)

    def check(n: int, chunk: int) -> None:
        hidden = (torch.randn(n, d) * 3).requires_grad_()
        labels, tw = torch.randint(0, vocab, (n,)), torch.rand(n) + 0.1
        total, gh, gw = _fused_weighted_nll(hidden.detach(), weight.detach(), labels, tw, chunk, dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = weighted_linear_nll(hidden, weight, labels, tw, chunk)
            scored = linear_token_logprobs(hidden.detach(), weight.detach(), labels, chunk)
        nh, nw = torch.autograd.grad(got, [hidden, weight])
        assert torch.equal(got.detach(), total)
        assert torch.equal(nh, gh) and torch.equal(nw, gw)
        w, h = weight.detach().to(dtype), hidden.detach().to(dtype)
        # chunk by chunk too: an fp32 product's bits can depend on its number of rows
        fused = torch.cat(
            [
                torch.log_softmax(h[i : i + chunk] @ w.T, dim=-1, dtype=torch.float32)
                for i in range(0, n, chunk)
            ]
        )
        assert torch.equal(scored, fused.gather(1, labels[:, None]).squeeze(1))

    check(11, 4)
    assert LOGIT_BUFFERS.kept is None
    with kept_logit_buffers():
        check(11, 4)
        first = {k: v.data_ptr() for k, v in LOGIT_BUFFERS.kept.items()}
        assert set(first) == {dtype, torch.float32}
        check(9, 3)  # other values, chunk and size: in the same (large enough) buffers
        assert {k: v.data_ptr() for k, v in LOGIT_BUFFERS.kept.items()} == first
        check(20, 16)  # larger: the buffers grow
        assert LOGIT_BUFFERS.kept[torch.float32].numel() == 16 * vocab
    assert LOGIT_BUFFERS.kept is None


def test_frozen_weights_stored_in_bf16_give_the_same_loss_and_gradients(tiny_causal) -> None:
    """Under bf16 autocast, a LoRA student's frozen base weights stored in bf16 for the steps give
    exactly today's loss and adapter gradients (autocast rounds them the same way), the tied
    output projection stays float32, and afterwards every weight is its float32 self again."""
    from kpod.distill.batches import collate
    from kpod.models import StudentConfig, frozen_linears_in

    torch.manual_seed(0)
    student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8).load()
    model = student.model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = build_stage_example(EXAMPLE, 1, student.tokenizer)
    batch = collate(
        [dataclasses.replace(ex, weights=[0.2 + (j % 5) / 5 for j in range(len(ex.labels))])], 0, "causal"
    )
    plain_loss, plain = _loss_and_grads(model, batch, "causal", from_hidden=True, precision="bf16")
    with frozen_linears_in(model, torch.bfloat16) as n:
        assert n == 2 * 7  # q, k, v, o, gate, up, down of both layers
        assert model.get_output_embeddings().weight.dtype == torch.float32  # tied to the embeddings
        stored_loss, stored = _loss_and_grads(model, batch, "causal", from_hidden=True, precision="bf16")
    assert stored_loss.item() == plain_loss.item()
    assert plain.keys() == stored.keys() and all("lora" in k for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(stored[name], grad, rtol=0, atol=0, msg=name)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_lora_scaling_folded_into_b_gives_the_same_loss_and_gradients(tiny_causal, precision) -> None:
    """With the scaling (alpha / r = 2) applied to B's weight instead of the adapter's output, the
    loss and every adapter gradient are the same bit for bit, as steps run in bf16 (frozen weights
    in bf16, LoRA inputs uncast, eager attention) and in fp32, and the element-wise products over
    the adapters' outputs are gone: one forward, one backward per adapted projection. A scaling
    that is not a power of two is left to peft; afterwards every layer runs peft's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kpod.distill.batches import collate
    from kpod.models import (
        StudentConfig,
        attention_implementation,
        frozen_linears_for,
        lora_input_casts_off,
        lora_scaling_folded,
    )

    class ActivationProducts(TorchDispatchMode):
        n = 0  # element-wise products with a (batch, length, features) result

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += func is torch.ops.aten.mul.Tensor and out.dim() == 3
            return out

    def counted(model, batch):
        with ActivationProducts() as products:
            loss, grads = _loss_and_grads(model, batch, "causal", from_hidden=True, precision=precision)
        return loss, grads, products.n

    torch.manual_seed(0)
    student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8, lora_dropout=0.0).load()
    model = student.model.eval()
    for name, param in model.named_parameters():  # B starts at zero: give it values to scale
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    ex = build_stage_example(EXAMPLE, 1, student.tokenizer)
    batch = collate(
        [dataclasses.replace(ex, weights=[0.2 + (j % 5) / 5 for j in range(len(ex.labels))])], 0, "causal"
    )
    with (
        frozen_linears_for(model, precision, "cpu"),
        lora_input_casts_off(model),
        attention_implementation(model, "eager"),
    ):
        counted(model, batch)  # the tied head's bf16 cast is made once, at the first pass
        plain_loss, plain, plain_products = counted(model, batch)
        with lora_scaling_folded(model) as n:
            assert n == 2 * 7  # q, k, v, o, gate, up, down of both layers
            loss, grads, products = counted(model, batch)
    assert loss.item() == plain_loss.item()
    assert plain.keys() == grads.keys() and all("lora" in k for k in plain) and len(plain) == 2 * 2 * 7
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    assert plain_products - products == 2 * 2 * 7
    assert all("forward" not in m.__dict__ for m in model.modules())

    odd = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=6, lora_dropout=0.0).load()
    with lora_scaling_folded(odd.model) as n:
        assert n == 0  # 1.5 would round differently


def test_lora_inputs_left_uncast_give_the_same_loss_and_gradients_with_fewer_copies(tiny_causal) -> None:
    """As training steps run (bf16 autocast, frozen weights in bf16, eager attention), LoRA layers
    that hand a bf16 input to their adapter uncast give exactly the same loss and adapter
    gradients, with fewer casts: o_proj's and down_proj's bf16 inputs no longer go to float32 and
    back, forward and backward. Layers with dropout keep the cast; afterwards every layer casts."""
    from tiny_models import counting_casts

    from kpod.distill.batches import collate
    from kpod.models import StudentConfig, attention_implementation, frozen_linears_in, lora_input_casts_off

    def counted(model, batch):
        with counting_casts() as casts:
            loss, grads = _loss_and_grads(model, batch, "causal", from_hidden=True, precision="bf16")
        return loss, grads, casts.n

    torch.manual_seed(0)
    student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8, lora_dropout=0.0).load()
    model = student.model.eval()
    ex = build_stage_example(EXAMPLE, 1, student.tokenizer)
    batch = collate(
        [dataclasses.replace(ex, weights=[0.2 + (j % 5) / 5 for j in range(len(ex.labels))])], 0, "causal"
    )
    with frozen_linears_in(model, torch.bfloat16), attention_implementation(model, "eager"):
        # One pass uncounted first: the tied output projection is cast to bf16 once, at the first
        # pass (kpod.models.cast_once), and reused after; the counted passes both reuse it.
        counted(model, batch)
        plain_loss, plain, plain_casts = counted(model, batch)
        with lora_input_casts_off(model) as n:
            assert n == 2 * 7  # q, k, v, o, gate, up, down of both layers
            loss, grads, casts = counted(model, batch)
    assert loss.item() == plain_loss.item()
    assert plain.keys() == grads.keys() and all("lora" in k for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    # o_proj and down_proj of both layers: bf16 -> fp32 -> bf16 in the forward pass, and the two
    # casts' backward casts, are gone.
    assert plain_casts - casts == 2 * 2 * 4
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    with_dropout = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8, lora_dropout=0.1).load()
    with lora_input_casts_off(with_dropout.model) as n:
        assert n == 0


@pytest.mark.parametrize("setting", ["plain", "dropout", "checkpointing"])
def test_norm_casts_shared_give_the_same_loss_and_gradients_with_fewer_casts(
    setting, tiny_causal, tiny_seq2seq
) -> None:
    """As training steps run under bf16 autocast (frozen weights in bf16, eager attention), the
    projections that read a norm's output sharing one cast of it give exactly the same loss and
    adapter gradients (their gradients still add up in float32), with fewer casts: per layer
    q, k, v and LoRA's three A read one cast instead of six, gate, up and their A one instead of
    four. With LoRA dropout the A layers read the dropout's output and cast it themselves; under
    gradient checkpointing the recomputed forward shares its casts too. In fp32 nothing changes;
    afterwards no hook is left. A model without llama-family norms (T5) is left alone."""
    from tiny_models import counting_casts

    from kpod.distill.batches import collate
    from kpod.models import StudentConfig, attention_implementation, frozen_linears_in, norm_casts_shared

    def counted(model, batch, precision="bf16"):
        torch.manual_seed(1)  # the same dropout masks in both runs
        with counting_casts() as casts:
            loss, grads = _loss_and_grads(model, batch, "causal", from_hidden=True, precision=precision)
        return loss, grads, casts.n

    torch.manual_seed(0)
    dropout = 0.1 if setting == "dropout" else 0.0
    student = StudentConfig(
        name=str(tiny_causal),
        lora_r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        gradient_checkpointing=setting == "checkpointing",
    ).load()
    model = student.model.train() if setting != "plain" else student.model.eval()
    for name, param in model.named_parameters():  # B starts at zero: give A a gradient
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    ex = build_stage_example(EXAMPLE, 1, student.tokenizer)
    batch = collate(
        [dataclasses.replace(ex, weights=[0.2 + (j % 5) / 5 for j in range(len(ex.labels))])], 0, "causal"
    )
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()  # checkpointing's own (peft's input gradients)
    with attention_implementation(model, "eager"):
        fp32_loss, fp32, _ = counted(model, batch, "fp32")
        with norm_casts_shared(model, torch.bfloat16):
            shared_fp32_loss, shared_fp32, _ = counted(model, batch, "fp32")
        with frozen_linears_in(model, torch.bfloat16):
            counted(model, batch)  # the tied head's bf16 cast is made once, at the first pass
            plain_loss, plain, plain_casts = counted(model, batch)
            with norm_casts_shared(model, torch.bfloat16) as n:
                assert n == 2 * 2  # two norms in each of the two layers
                loss, grads, casts = counted(model, batch)
    assert loss.item() == plain_loss.item() and shared_fp32_loss.item() == fp32_loss.item()
    assert plain.keys() == grads.keys() and len(plain) == 2 * 2 * 7
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(shared_fp32[name], fp32[name], rtol=0, atol=0, msg=name)
    per_layer = (3 - 1) + (2 - 1) if setting == "dropout" else (6 - 1) + (4 - 1)
    passes = 2 if setting == "checkpointing" else 1  # checkpointing runs the forward pass twice
    assert plain_casts - casts == 2 * per_layer * passes
    assert hooks() == before
    with norm_casts_shared(StudentConfig(name=str(tiny_seq2seq), lora_r=4).load().model, torch.bfloat16) as n:
        assert n == 0


def test_compiled_forward_gives_the_same_loss_and_gradients_at_every_length(tiny_causal) -> None:
    """``train.compile``: the compiled forward (dynamic shapes) gives eager's loss and adapter
    gradients to fp32 rounding on padded batches of two different lengths and sizes, with weights
    that differ at every token; outside the block the model runs its own forward again.
    ``compile_stats`` says what the compilation did: its phases' seconds, the graphs made, and
    inductor's cache answering for them (a hit or a miss, by whether an earlier test compiled the
    same graph); one attempt, not two (python floats compiled as constants)."""
    from kpod.distill.batches import collate
    from kpod.models import StudentConfig, compile_stats, compiled_forward, forward_replaced, inner_model

    torch.manual_seed(0)
    student = StudentConfig(name=str(tiny_causal), lora_r=4, lora_alpha=8).load()
    model, tokenizer = student.model.eval(), student.tokenizer
    compiled = compiled_forward(model)
    before = compile_stats()
    examples = []
    for k, steps in enumerate([0, 1, 2]):
        ex = build_stage_example(EXAMPLE, steps, tokenizer)
        examples.append(
            dataclasses.replace(ex, weights=[0.1 + ((j * 7 + k) % 11) / 11 for j in range(len(ex.labels))])
        )
    for batch in (collate(examples, tokenizer.pad_token_id, "causal"), collate(examples[1:], 0, "causal")):
        eager_loss, eager = _loss_and_grads(model, batch, "causal", from_hidden=True)
        with forward_replaced(model, compiled):
            assert inner_model(model).forward is compiled
            loss, grads = _loss_and_grads(model, batch, "causal", from_hidden=True)
        assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
        assert grads.keys() == eager.keys() and all("lora" in k for k in grads)
        for name, grad in eager.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(inner_model(model))
    stats = compile_stats(since=before)
    assert stats["unique_graphs"] >= 1 and sum(stats["seconds"].values()) > 0
    # Floats compiled as constants: dynamo traced the model once, without restarting its analysis.
    assert "compile_attempt_0" in stats["seconds"] and "compile_attempt_1" not in stats["seconds"]
    inductor = {k: n for k, n in stats["caches"].items() if k.startswith("inductor.fxgraph_cache_")}
    assert sum(inductor.values()) >= 2  # the forward's graph and the backward's, each looked up
    assert compile_stats(since=compile_stats()) == {
        "seconds": {},
        "caches": {},
        "unique_graphs": 0,
        "graph_breaks": 0,
    }  # nothing compiled in between


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_eager_attention_gives_the_loss_and_gradients_of_sdpa(
    kind, tmp_path, tiny_seq2seq, monkeypatch
) -> None:
    """``train.attention``: a LoRA student switched to eager attention for a step gives sdpa's
    loss and adapter gradients to fp32 rounding, on a padded batch of a model with grouped
    key/value heads (4 query heads share 2), with weights that differ at every token; inside the
    block the model attends with ``eager``, afterwards with ``sdpa`` again."""
    from tiny_models import build_causal

    from kpod.distill.batches import collate
    from kpod.models import StudentConfig, attention_implementation, inner_model

    path = build_causal(tmp_path / "gqa", heads=4, kv_heads=2) if kind == "causal" else tiny_seq2seq
    torch.manual_seed(0)
    student = StudentConfig(name=str(path), lora_r=4, lora_alpha=8).load()
    model, tokenizer = student.model.eval(), student.tokenizer
    config = inner_model(model).config
    assert config._attn_implementation == "sdpa"
    short = make_example(qid="q2", question="What is 3+4?", rationale="3+4 = 7.\nSo 7.", answer="7")
    examples = []
    for k, (example, steps) in enumerate([(EXAMPLE, 0), (short, 1), (EXAMPLE, 2)]):
        ex = build_stage_example(example, steps, tokenizer, kind=kind)
        examples.append(
            dataclasses.replace(ex, weights=[0.1 + ((j * 7 + k) % 11) / 11 for j in range(len(ex.labels))])
        )
    batch = collate(examples, tokenizer.pad_token_id, kind)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # padded rows: the mask reaches both
    sdpa_loss, sdpa = _loss_and_grads(model, batch, kind, from_hidden=True)
    calls = []
    if kind == "causal":  # the eager function itself runs (not only the config's name changes)
        from transformers.models.llama import modeling_llama

        eager = modeling_llama.eager_attention_forward
        monkeypatch.setattr(
            modeling_llama, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k)
        )
    with attention_implementation(model, "eager"):
        assert config._attn_implementation == "eager"
        loss, grads = _loss_and_grads(model, batch, kind, from_hidden=True)
    assert config._attn_implementation == "sdpa"
    assert len(calls) == (2 if kind == "causal" else 0)  # one per layer
    assert loss.item() == pytest.approx(sdpa_loss.item(), rel=1e-5)
    assert grads.keys() == sdpa.keys() and all("lora" in k for k in grads) and grads
    for name, grad in sdpa.items():
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    if kind == "seq2seq":  # the encoder attends both ways: without its mask, padded rows' losses move
        unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
        with attention_implementation(model, "eager"):
            leaky, _ = _loss_and_grads(model, unmasked, kind, from_hidden=True)
        assert leaky.item() != pytest.approx(sdpa_loss.item(), rel=1e-5)


def test_training_attention_is_eager_only_for_short_cpu_batches_under_bf16() -> None:
    from kpod.errors import ModelError
    from kpod.models import EAGER_ATTENTION_MAX_LENGTH, training_attention

    short, long = EAGER_ATTENTION_MAX_LENGTH, EAGER_ATTENTION_MAX_LENGTH + 1
    assert training_attention("auto", short, "cpu", False, "bf16") == "eager"
    assert training_attention("auto", short, "cpu", False, "fp16") == "eager"
    assert training_attention("auto", long, "cpu", False, "bf16") is None
    assert training_attention("auto", short, "cpu", False, "fp32") is None  # flash backward fast in fp32
    assert training_attention("auto", short, "cuda", False, "bf16") is None
    assert training_attention("auto", short, "cpu", True, "bf16") is None
    assert training_attention("sdpa", short, "cpu", False, "bf16") == "sdpa"
    assert training_attention("eager", long, "cuda", True, "fp32") == "eager"
    assert training_attention("eager", short, "cpu", False, "fp32") == "eager"
    with pytest.raises(ModelError, match="attention must be one of"):
        training_attention("flash", short, "cpu", False, "bf16")


@pytest.mark.parametrize("attention", [None, "eager"])
@pytest.mark.parametrize("from_hidden", [False, True])
def test_packed_examples_do_not_attend_to_each_other(tiny_causal, from_hidden, attention) -> None:
    """Each example's loss in a packed row equals its loss alone (fp32), so no example sees
    another; and packing wastes no position on padding between examples. With the model's own
    attention (sdpa) and with eager (``train.attention``)."""
    from kpod.models import attention_implementation, inner_model, load_model

    student = load_model(str(tiny_causal))
    with attention_implementation(student.model, attention):
        assert inner_model(student.model).config._attn_implementation == (attention or "sdpa")
        _check_packed(student, from_hidden)


def _check_packed(student, from_hidden) -> None:
    from kpod.distill.batches import collate, collate_packed
    from kpod.distill.loss import sequence_nll

    model = student.model.eval()
    pad = student.tokenizer.pad_token_id
    examples = [build_stage_example(EXAMPLE, c, student.tokenizer) for c in (0, 1, 2, 0)]
    examples = [
        dataclasses.replace(e, weights=[0.1 + ((j + 3 * k) % 7) / 7 for j in range(len(e.labels))])
        for k, e in enumerate(examples)
    ]
    lengths = [len(e.input_ids) for e in examples]
    packed = collate_packed(examples, pad, row_length=2 * max(lengths) + 1)
    assert packed["input_ids"].shape[0] == 2 and "attention_mask" in packed
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    with torch.no_grad():
        alone = [
            float(sequence_nll(model, collate([e], pad, "causal"), "causal", 0, 0, from_hidden))
            for e in examples
        ]
        together = float(sequence_nll(model, packed, "causal", 0, 0, from_hidden))
        assert together == pytest.approx(sum(alone), rel=1e-5)
        # Each example alone: zero every other example's weights in the packed batch.
        for k, e in enumerate(examples):
            only = [
                e if i == k else dataclasses.replace(x, weights=[0.0] * len(x.weights))
                for i, x in enumerate(examples)
            ]
            got = float(
                sequence_nll(
                    model, collate_packed(only, pad, 2 * max(lengths) + 1), "causal", 0, 0, from_hidden
                )
            )
            assert got == pytest.approx(alone[k], rel=1e-5), k
        # Without the position ids the examples would see each other: the test can tell.
        leaky = dict(packed)
        del leaky["position_ids"]
        leaky["attention_mask"] = torch.ones_like(packed["attention_mask"])
        assert float(sequence_nll(model, leaky, "causal", 0, 0, from_hidden)) != pytest.approx(
            sum(alone), rel=1e-5
        )
