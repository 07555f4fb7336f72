"""The distillation step's settings (``train:`` in a config, the options of `kpod distill`). Kept
apart from the trainer so that reading a config or building the CLI needs no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from kpod.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Distillation hyper-parameters (one config for every method).

    Attributes:
        method: a registered method's name (:data:`kpod.distill.methods.METHODS`).
        epochs: training epochs; stage t is epoch t (paper: 20 or 40 for LLaMA-7B).
        batch_size: examples per optimiser step, over all processes (paper: 4).
        micro_batch_size: examples per forward pass on one process (gradient accumulation
            makes up the rest; the loss does not depend on it, up to rounding), or ``auto``
            (default): the whole batch on a GPU; on a CPU the batch in the fewest equal parts of
            at most 1,024 padded tokens each, which ran the real loop 10 % faster than one pass
            of 1,300-1,800 tokens, with a quarter less peak memory
            (:func:`kpod.distill.batches.micro_batch_rows`; BENCHMARKS.md "Issue #21, session 35").
        lr: peak learning rate (paper: 1e-5 for LLaMA-7B with LoRA, 5e-5 for FlanT5). Small LoRA
            students on few examples need more; the quickstart uses 1e-3.
        weight_decay: AdamW's decoupled weight decay (the paper's Adam: 0).
        warmup_ratio: share of all steps spent warming the learning rate up linearly from 0.
        lr_schedule: after warm-up: ``linear`` decay to 0, ``cosine`` or ``constant``.
        max_grad_norm: gradient clipping (0 turns it off).
        max_length: examples whose sequence is longer are left out (counted in the log).
        precision: ``bf16``/``fp16`` autocast with float32 weights, ``fp32``, or ``auto``
            (default): bf16 on a GPU that has it and on a CPU with fast bf16 products (AVX512 or
            AMX), fp32 elsewhere (:func:`kpod.precision.compute_precision`; bf16 products on an
            AVX2-only CPU ran 60-90x slower than fp32's, BENCHMARKS.md "Issue #21, session 32").
        seed: seeds data order, initialisation of adapters and dropout.
        save_every: also checkpoint every this many optimiser steps (0: stage ends only).
        keep_checkpoints: how many checkpoints to keep.
        group_by_length: batch examples of similar length together (less padding).
        step_by_step_alpha: weight of the rationale task of ``step-by-step``.
        mcc_kd_alpha: weight of ``mcc-kd``'s consistency term (Chen et al. 2023 use 0.01 for
            LLaMA).
        select: which epoch's model is kept: ``dev`` (the best dev accuracy among the epochs that
            trained whole rationales, i.e. from stage T on for a progressive method; the later of
            equal ones) or ``last``. Dev is scored only where an epoch is eligible.
        select_from_epoch: with ``select: dev``, also leave out of the selection (and of dev
            scoring) the epochs before this one, counted from 1 (0: no such limit). A comparison
            of a progressive method with a plain one sets it to T so that both choose among the
            same epochs and spend the same dev evaluations.
        test_last_epoch: also score the last epoch's model on the test split when dev selection
            kept an earlier stage (``TrainResult.test_last``; predictions in
            ``test_predictions_last.jsonl``): the figure without model selection, which a small dev
            split makes noisy. Costs one more test evaluation in those runs.
        eval_batch_size, eval_max_new_tokens: generation settings for dev and test scoring.
            ``eval_batch_size: auto`` (default) generates as many rows together as a fixed
            key/value-cache budget allows, up to 128 (:func:`kpod.kv_cache.auto_batch_size`; for
            SmolLM2-135M 32 to 128 by length and precision, fewer for larger models); a number
            fixes it.
        eval_precision: ``auto`` (the faster of fp32 and bf16 for generating on this machine,
            measured once and cached: :mod:`kpod.precision`), ``fp32`` or ``bf16``. `kpod run`'s
            evaluation of the untrained student uses it too (and ``eval_batch_size``).
        merge_lora: save the student with LoRA merged into its weights (loads without peft).
        loss_from_hidden: compute the loss from the hidden states of the labelled positions, the
            output projection applied ``loss_chunk`` positions at a time, instead of from the
            model's logits of every position (same loss and gradients; less time and memory,
            BENCHMARKS.md "Issue #21"). Students whose head the bypass cannot stand in for use the
            logits whatever this says (:func:`kpod.distill.loss.head_bypass_supported`).
        loss_chunk: positions per chunk of the output projection when ``loss_from_hidden``.
        packing: pack a micro-batch's examples into rows of up to ``max_length`` tokens, with
            position ids and no attention mask (block-diagonal attention, no padding between
            examples; causal students; not ``mcc-kd``). Off by default: see BENCHMARKS.md "Issue
            #21" for what it does to the speed on a CPU.
        attention: the attention implementation of training steps (generation and scoring keep
            the model's own): ``auto`` (default) uses transformers' ``eager`` attention on a CPU
            under bf16 for batches up to 224 tokens, whose backward is faster there than PyTorch's
            CPU flash attention, and ``sdpa`` beyond (and in fp32, on a GPU, and under
            ``compile``); ``sdpa`` or ``eager`` for every batch. A student loaded with another
            implementation keeps it (:func:`kpod.models.training_attention`; BENCHMARKS.md "Issue
            #21, sessions 27 and 33").
        recompute_elementwise: keep less of each training step for its backward pass and
            recompute the rest there: eager attention's softmax (its float32 output, its bf16
            copy, the repeated key and value heads) and a llama-style MLP's activation output
            (:func:`kpod.models.elementwise_recomputed`). The same losses and gradients bit for
            bit; on by default for the memory (about a tenth of the 135M student's peak), at
            the loop's speed within its spread under jemalloc (the kpod command's allocator) and
            possibly up to a tenth slower under glibc's malloc, where a run short of time rather
            than memory may set it off (BENCHMARKS.md "Issue #21, session 40"). Does nothing
            under ``compile`` or the student's ``gradient_checkpointing`` (which recomputes whole
            layers).
        compile: run the student's forward and backward passes of training steps through
            ``torch.compile`` (inductor, dynamic shapes: one compilation for every batch length;
            dev and test generation stay eager). The first step pays the compilation (on a
            2-core CPU about 5 minutes, half a minute with inductor's cache warm;
            ``train_log.jsonl``'s first row says which phase took them); the losses equal the
            eager ones up to the fused kernels' rounding. Off by default; see BENCHMARKS.md
            "Issue #21, session 14" for what it buys.
    """

    # Added after results were keyed; at their default they do what ran before (kpod.config.key_data).
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("compile", "recompute_elementwise")
    # Added later with a default that changed what runs (so part of every key): what a checkpoint
    # written before such a field existed ran with, so that it resumes only under that value.
    FORMER_VALUES: ClassVar[dict[str, Any]] = {"attention": "sdpa"}

    method: str = "kpod"
    epochs: int = 4
    batch_size: int = 8
    micro_batch_size: int | Literal["auto"] = "auto"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    max_length: int = 512
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    group_by_length: bool = True
    step_by_step_alpha: float = 1.0
    mcc_kd_alpha: float = 0.01
    select: Literal["dev", "last"] = "dev"
    select_from_epoch: int = 0
    test_last_epoch: bool = False
    eval_batch_size: int | Literal["auto"] = "auto"
    eval_max_new_tokens: int = 256
    eval_precision: Literal["auto", "fp32", "bf16"] = "auto"
    merge_lora: bool = False
    loss_from_hidden: bool = True
    loss_chunk: int = 512
    packing: bool = False
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    recompute_elementwise: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        from kpod.distill.methods import METHODS  # the registry, as it stands when the config is read

        if self.method not in METHODS:
            raise ConfigError(f"method: '{self.method}' is not allowed; choose one of: {', '.join(METHODS)}")
        for name in (
            "epochs",
            "batch_size",
            "max_length",
            "keep_checkpoints",
            "loss_chunk",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "eval_batch_size"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 or auto, got {getattr(self, name)}")
        if not 0 <= self.select_from_epoch <= self.epochs:
            raise ConfigError(
                f"select_from_epoch must be between 0 and epochs ({self.epochs}), "
                f"got {self.select_from_epoch}"
            )
        if self.mcc_kd_alpha < 0:
            raise ConfigError(f"mcc_kd_alpha must be >= 0, got {self.mcc_kd_alpha}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.save_every < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                "lr must be > 0, warmup_ratio in [0, 1), save_every >= 0 and max_grad_norm >= 0; "
                f"got lr={self.lr}, warmup_ratio={self.warmup_ratio}, save_every={self.save_every}, "
                f"max_grad_norm={self.max_grad_norm}"
            )
