"""Tiny randomly-initialised models and a tiny tokenizer, built offline in a few seconds."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    from kpod.data.synthetic import arithmetic_examples

    texts = []
    for e in arithmetic_examples(200, seed=123):
        texts += [e.question, e.rationale, f"Therefore, the answer is {e.answer}."]
    texts += ["Q: A: Let's think step by step. 0 1 2 3 4 5 6 7 8 9 + - * / = $ % , . ? !"]
    return texts


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_causal(
    directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0, heads: int = 2, kv_heads: int = 2
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def build_seq2seq(directory: Path, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=16,
        d_ff=2 * hidden,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def counting_kernels(**ops):
    """A dispatch mode that counts the kernels ``ops`` (name: aten overload) that run inside it,
    autocast's casts included (a selective checkpoint's replay of a kept result runs none): ``with
    counting_kernels(softmax=torch.ops.aten._softmax.default) as kernels: ...``, then
    ``kernels.counts["softmax"]``, or ``kernels.n`` for all of them together."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts = dict.fromkeys(ops, 0)

        @property
        def n(self) -> int:
            return sum(self.counts.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for name, op in ops.items():
                self.counts[name] += func is op
            return func(*args, **(kwargs or {}))

    return Kernels()


def counting_casts():
    """A dispatch mode that counts the dtype casts (``aten._to_copy``) run inside it, autocast's
    included: ``with counting_casts() as casts: ...``, then ``casts.n``."""
    import torch

    return counting_kernels(casts=torch.ops.aten._to_copy.default)


def resident_file_mib() -> float:
    """This process's resident pages of mapped files (``RssFile`` of ``/proc/self/status``), MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile"))
    return int(line.split()[1]) / 1024


def memory_file_system(path: Path) -> str | None:
    """``tmpfs`` or ``ramfs`` where ``path`` lies on a memory-backed file system, whose files have
    no disk to drop their pages to; ``None`` elsewhere."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    mount = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
    return mount[2] if mount[2] in ("tmpfs", "ramfs") else None
