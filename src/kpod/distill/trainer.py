"""The one distillation loop, for every method (see :mod:`kpod.distill.methods`).

Read it top to bottom in :func:`train` and the parts of :class:`DistillRecipe` it calls, in that
order (set-up, an epoch of loss steps, the stage's end with dev selection, finishing).

Stages as in the paper (section 3.4): epoch t trains the schedule's stage t, t = 1..T, so the
epoch numbered e from 0 trains stage e + 1; stage T gives every rationale whole (D(T) = B) and the
epochs after T train whole rationales too. (The schedule's stage 0, D(0) = C0, is the starting
point the first selection moves from; it is never trained.) At the start of each epoch the
method's :class:`~kpod.distill.methods.StageBuilder` gives that stage's examples
(inputs c_i(t), labels, token weights), which are cut into length-grouped optimiser-step batches.
Each step's loss is the weighted token NLL normalised by the number of target tokens in the whole
step (every micro-batch of every process), so accumulation and data parallelism do not change it.

accelerate runs the loop on one process or many (DDP or FSDP from ``accelerate launch`` and its
config), with bf16/fp16 autocast. DeepSpeed is refused with a clear error for now: its engine
rescales losses by its own accumulation count, which this loop's exact normalisation would have to
undo, and we cannot test that here.

Checkpoints (model or adapter, optimiser, scheduler, RNG states, data position, best dev result)
go to ``OUTPUT/checkpoints`` every ``save_every`` steps and at each stage end; a run started again
on the same directory continues where the newest complete checkpoint left it, mid-stage included.

Model selection (``select: dev``): after each epoch that trained whole rationales (from stage T on
for a progressive method, every epoch otherwise; none before ``select_from_epoch``), accuracy on
the dev split (greedy generation of the whole rationale); the best such epoch's trainable weights,
the later of equal ones, are kept and restored at the end. Earlier epochs are not eligible: their
model was trained to finish rationales whose first steps it is given, yet is evaluated on writing
one. The test split,
when given, is scored at the end (resumable: its generations are recorded batch by batch, see
:func:`kpod.evaluate.evaluate`). The student is saved with ``save_pretrained`` in
``OUTPUT/student`` (LoRA adapters, or merged into the base weights with ``merge_lora``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kpod.allocator import HeapTrimmer, cpu_allocator_hint
from kpod.chunked_loss import head_bypass_supported, kept_logit_buffers
from kpod.config import late_defaults
from kpod.data.schema import Example
from kpod.distill.batches import global_batches, micro_batch_rows, process_share
from kpod.distill.checkpoint import latest_checkpoint, read_state, save_checkpoint
from kpod.distill.config import TrainConfig
from kpod.distill.loss import IGNORE
from kpod.distill.methods import StageBuilder, StudentShape
from kpod.distill.stages import StageExample
from kpod.errors import ConfigError
from kpod.io import write_json
from kpod.lock import holds_lock
from kpod.models import (
    attention_implementation,
    compile_stats,
    compile_unavailable,
    compiled_forward,
    elementwise_recomputed,
    forward_replaced,
    frozen_linears_for,
    lora_input_casts_off,
    lora_scaling_folded,
    norm_casts_shared,
    torch_dtype,
    training_attention,
)
from kpod.precision import compute_precision
from kpod.prompt import PromptFormat


@contextlib.contextmanager
def training_step_weights(
    model: Any,
    precision: str,
    device_type: str,
    compiled: Any = None,
    share_norm_casts: bool = True,
    recompute_elementwise: bool = False,
) -> Iterator[None]:
    """Within the block, the student as the trainer's steps see it: frozen weights stored in bf16
    under bf16 autocast on a CPU (the same numbers, without a cast per forward pass:
    :func:`kpod.models.frozen_linears_for`), LoRA inputs not cast to float32 on their way to a
    product that casts them back (the same numbers: :func:`kpod.models.lora_input_casts_off`), the
    LoRA scaling applied to B instead of the adapter's output where that is exact (the same
    numbers: :func:`kpod.models.lora_scaling_folded`), and with a ``compiled`` forward that one
    (:func:`kpod.models.forward_replaced`), without, under autocast, each norm's output cast once
    for all the projections that read it (the same numbers: :func:`kpod.models.norm_casts_shared`;
    inductor fuses those casts itself). ``precision`` is the resolved one (fp32, bf16, fp16). The
    benchmarks that time a bare step use it too, so that they time what the trainer runs (all but
    the recomputation below, which they leave off); ``share_norm_casts=False`` is theirs, for the
    per-reader casts the trainer ran before session 38. ``recompute_elementwise`` (the trainer
    passes ``train.recompute_elementwise``): attention's softmax and the MLP's activation
    recomputed in the backward pass instead of kept, without a ``compiled`` forward (the same
    numbers, less memory: :func:`kpod.models.elementwise_recomputed`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_linears_for(model, precision, device_type))
        stack.enter_context(lora_input_casts_off(model))
        stack.enter_context(lora_scaling_folded(model))
        if compiled is not None:
            stack.enter_context(forward_replaced(model, compiled))
        elif precision != "fp32" and share_norm_casts:
            stack.enter_context(norm_casts_shared(model, torch_dtype(precision)))
        if compiled is None and recompute_elementwise:
            stack.enter_context(elementwise_recomputed(model))
        yield


def _forget_other_mixed_precision(mixed: str) -> None:
    """Let this process train in another precision than its last training did (fp32 and then
    ``auto``'s bf16 in one notebook, or the test suite): accelerate keeps one mixed precision per
    process and refuses a second ("AcceleratorState has already been initialized"). Its
    per-process state is forgotten then; the process group (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    known = AcceleratorState._shared_state.get("_mixed_precision")
    if known is not None and known != mixed:
        AcceleratorState._reset_state()


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``OUTPUT/training.json``)."""

    method: str
    steps: int
    epochs: int
    train_tokens: int
    target_tokens: int
    seconds: float
    tokens_per_s: float
    skipped_too_long: int
    processes: int = 1
    precision: str = ""  # what ``train.precision`` ran as (``auto`` resolved: kpod.precision)
    stage_loss: list[float] = field(default_factory=list)
    dev: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    test: dict[str, Any] | None = None
    test_last: dict[str, Any] | None = None  # the last epoch's model on test (``test_last_epoch``)
    student_dir: str = ""

    def summary(self) -> dict[str, Any]:
        """Every field, the test results without their per-question lists (for printing and
        stage records; ``training.json`` keeps them whole)."""
        return {**asdict(self), "test": test_summary(self.test), "test_last": test_summary(self.test_last)}


def test_summary(test: dict[str, Any] | None) -> dict[str, Any] | None:
    """A test result without its per-question lists (for printing and stage records)."""
    if not test:
        return None
    return {k: v for k, v in test.items() if k not in ("per_question", "qids")}


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lr_scheduler(optimizer: Any, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.lr_schedule]
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


class _Log:
    """train_log.jsonl (main process) and TensorBoard when installed."""

    def __init__(self, directory: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = directory / "train_log.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _evaluate(
    model: Any,
    student: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    fmt: PromptFormat,
    prefix: str,
    out: Path | None,
) -> dict[str, Any]:
    from kpod.evaluate import evaluate, weights_fingerprint

    was_training = model.training
    model.eval()
    # Test predictions (``out``) are resumable: a run killed while scoring test picks up the
    # generations of the same weights (a checkpoint restored, then the best stage's weights).
    resume_key = weights_fingerprint(model) if out is not None else None
    result = evaluate(
        model,
        student.tokenizer,
        examples,
        kind=student.kind,
        fmt=fmt,
        batch_size=config.eval_batch_size,
        max_new_tokens=config.eval_max_new_tokens,
        out=out,
        question_prefix=prefix,
        progress=False,
        resume_key=resume_key,
        precision=config.eval_precision,
    )
    model.train(was_training)
    return {
        **result.summary(),
        "per_question": [bool(p["correct"]) for p in result.predictions],
        "qids": [p["qid"] for p in result.predictions],
    }


@holds_lock("output_dir", directory=True)
def train(
    config: TrainConfig,
    student: Any,
    builder: StageBuilder,
    output_dir: str | Path,
    *,
    dev: Sequence[Example] = (),
    test: Sequence[Example] = (),
    fmt: PromptFormat | None = None,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train ``student`` (a :class:`kpod.models.LoadedModel`) on ``builder``'s stages.

    With ``resume`` a run finding checkpoints in ``output_dir`` continues from the newest; without
    it, existing checkpoints are an error (nothing is overwritten by accident).

    Starting again with the same ``output_dir`` resumes from its newest checkpoint. The folder's
    writer lock is held throughout; under ``accelerate launch`` the main process takes it before the
    process group forms, so a refused run stops every rank before any of them writes.
    """
    recipe = DistillRecipe(
        config, student, builder, Path(output_dir), dev, test, fmt or PromptFormat(), progress
    )
    recipe.setup(resume)
    for epoch in range(recipe.start_epoch, config.epochs):
        recipe.train_epoch(epoch)
        recipe.end_epoch(epoch)
    return recipe.finish()


class DistillRecipe:
    """The loop in named parts, in the order :func:`train` calls them (torchtune's recipe shape):

    - :meth:`setup`: accelerate, the optimiser and scheduler, checkpoint hooks, resuming;
    - :meth:`train_epoch`: one stage's batches, each through :meth:`loss_step`, with logging and
      mid-stage checkpoints;
    - :meth:`loss_step`: one optimiser step: the method's loss on every micro-batch, normalised by
      the step's target tokens, then clipping and the update;
    - :meth:`end_epoch`: the stage's mean loss, :meth:`select_on_dev`, a checkpoint;
    - :meth:`finish`: the kept stage's weights restored, the test split scored, the student saved.
    """

    def __init__(
        self,
        config: TrainConfig,
        student: Any,
        builder: StageBuilder,
        output: Path,
        dev: Sequence[Example],
        test: Sequence[Example],
        fmt: PromptFormat,
        progress: bool,
    ) -> None:
        self.config = config
        self.student = student
        self.builder = builder
        self.output = output
        self.dev = dev
        self.test = test
        self.fmt = fmt
        self.progress = progress
        self.ckpt_root = output / "checkpoints"
        self.best_path = output / "best_trainable.safetensors"
        self.skipped = 0
        self.heap = HeapTrimmer()  # on a CPU, the heap trimmed back only when it has grown

    def setup(self, resume: bool) -> None:
        """Everything before the first step; after a crash, the newest checkpoint's state."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        config, student, output = self.config, self.student, self.output
        # auto: bf16 where its products are fast (kpod.precision.compute_precision), else fp32
        self.precision = compute_precision(config.precision, "cuda" if torch.cuda.is_available() else "cpu")
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        _forget_other_mixed_precision(mixed)
        # cpu=True without CUDA: under `accelerate launch --multi_gpu` (torchrun) on a CPU-only machine
        # accelerate then builds a gloo process group instead of running each process alone.
        accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        why = compile_unavailable(accelerator.device.type) if config.compile else None
        if why:
            raise ConfigError(f"train.compile: {why}; install one or set train.compile: false")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "DeepSpeed is not supported by the kpod loop yet; use DDP or FSDP (accelerate config)"
            )
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        set_seed(config.seed)
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
        model = student.model
        tokenizer = student.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        decoder_start = getattr(model.config, "decoder_start_token_id", None)
        decoder_start = pad if decoder_start is None else decoder_start
        self.pad = pad
        from_hidden = config.loss_from_hidden and head_bypass_supported(model)
        self.shape = StudentShape(student.kind, pad, decoder_start, from_hidden, config.loss_chunk)

        n_examples = len(self.builder.stage(schedule_stage(0)))
        self.steps_per_epoch = math.ceil(n_examples / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = _lr_scheduler(optimizer, config, self.total_steps)
        # The scheduler is stepped by hand: accelerate would step a prepared one once per process.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        # LoRA: checkpoints hold the trainable weights only (the frozen base is the loaded model),
        # which keeps a 7B student's checkpoint in megabytes. FSDP shards state its own way: saved whole.
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        partial = len(trainable) < len(list(self.model.parameters())) and (
            accelerator.distributed_type != DistributedType.FSDP
        )
        if partial:

            def keep_trainable(models: Any, weights: list[dict[str, Any]], output_dir: str) -> None:
                for i, state_dict in enumerate(weights):
                    weights[i] = {k: v for k, v in state_dict.items() if k in trainable}

            accelerator.register_save_state_pre_hook(keep_trainable)

        self.state: dict[str, Any] = {
            "step": 0,
            "best_accuracy": None,
            "best_epoch": None,
            "dev": [],
            "stage_loss": [],
            "train_tokens": 0,
            "target_tokens": 0,
            "seconds": 0.0,
            "epoch_loss": [0.0, 0],
        }
        state = self.state
        resumed_from = latest_checkpoint(self.ckpt_root)
        if resumed_from is not None and not resume:
            raise ConfigError(
                f"{output} already holds checkpoints (newest: {resumed_from.name}); pass --resume to "
                "continue that run, or choose another --out"
            )
        if resumed_from is not None:
            accelerator.load_state(str(resumed_from), strict=not partial)
            state.update(read_state(resumed_from))
            stored = {**late_defaults(TrainConfig), **TrainConfig.FORMER_VALUES, **state.get("config", {})}
            if state.get("config") and stored != asdict(config):
                changed = [k for k, v in asdict(config).items() if stored.get(k) != v]
                raise ConfigError(
                    f"{output}: holds a run with different settings ({', '.join(changed)}); "
                    "use a new output directory or delete its checkpoints"
                )
        state["config"] = asdict(config)
        self.log = _Log(output, state["step"], accelerator.is_main_process)
        self.bar = tqdm(
            total=self.total_steps,
            initial=state["step"],
            desc=config.method,
            disable=not (self.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        if resumed_from is not None and accelerator.is_main_process:
            print(
                f"resuming from {resumed_from} (step {state['step']} of {self.total_steps})", file=sys.stderr
            )
        if (
            accelerator.device.type == "cpu"
            and accelerator.is_main_process
            and state["step"] < self.total_steps
        ):
            hint = cpu_allocator_hint()
            if hint:
                print(hint, file=sys.stderr)
        self.start_time = time.perf_counter() - state["seconds"]
        self.model.train()
        # Made once, so that its compiled graphs serve every epoch (torch.compile is lazy: the
        # first step compiles).
        self.compiled_forward = compiled_forward(self.model) if config.compile else None
        self.compile_before = compile_stats() if config.compile else None  # logged at the first step
        if config.compile and accelerator.is_main_process and state["step"] < self.total_steps:
            print(
                "train.compile: the first step compiles the model (minutes on a CPU, fewer once "
                "inductor's cache holds it; train_log.jsonl's first row says where they went)",
                file=sys.stderr,
            )

    @property
    def start_epoch(self) -> int:
        """The stage the run starts in (later than 0 when resumed)."""
        return self.state["step"] // self.steps_per_epoch

    def _stage_batches(self, epoch: int) -> tuple[list[StageExample], list[list[int]]]:
        """The stage's examples and its optimiser-step batches (indices; too-long ones left out)."""
        config = self.config
        examples = self.builder.stage(schedule_stage(epoch))
        too_long = [e.longest > config.max_length for e in examples]
        if sum(too_long) and sum(too_long) != self.skipped and self.accelerator.is_main_process:
            print(
                f"stage {epoch}: {sum(too_long)} of {len(examples)} examples are longer than max_length "
                f"{config.max_length} tokens and are left out (raise train.max_length to keep them)",
                file=sys.stderr,
            )
        self.skipped = sum(too_long)
        causal = self.student.kind == "causal"
        lengths = [e.size(causal) for e in examples]
        keep = [i for i, bad in enumerate(too_long) if not bad]
        batches = [
            [keep[i] for i in b]
            for b in global_batches(
                [lengths[i] for i in keep], config.batch_size, config.seed, epoch, config.group_by_length
            )
        ]
        batches += [[]] * (self.steps_per_epoch - len(batches))  # skipped examples: keep the step count
        return examples, batches

    def loss_step(self, examples: Sequence[StageExample], batch: list[int]) -> tuple[float, int, int]:
        """One optimiser step on ``batch``; returns (loss, tokens processed, target tokens)."""
        accelerator, model, world = self.accelerator, self.model, self.world
        n_targets = sum(examples[i].n_targets for i in batch)
        causal = self.student.kind == "causal"
        rows = micro_batch_rows(
            math.ceil(len(batch) / world),
            max(examples[i].size(causal) for i in batch),
            self.config.micro_batch_size,
            accelerator.device.type,
        )
        micro = process_share(batch, self.rank, world, rows)
        step_loss = torch.zeros((), device=accelerator.device)
        tokens = torch.zeros((), device=accelerator.device)
        for k, mb in enumerate(micro):
            pack = self.config.max_length if self.config.packing else 0
            tensors = self.builder.method.collate(
                [examples[i] for i in mb.indices], self.pad, self.student.kind, pack
            )
            tensors = {key: value.to(accelerator.device) for key, value in tensors.items()}
            sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
            attention = training_attention(
                self.config.attention,
                max(value.shape[-1] for key, value in tensors.items() if key in ("input_ids", "labels")),
                accelerator.device.type,
                self.compiled_forward is not None,
                self.precision,
            )
            # The backward pass inside the attention block, as it is inside DDP's no_sync: under
            # gradient checkpointing it runs the forward again, which must use the same attention
            # (else torch.utils.checkpoint refuses the recomputed tensors); autocast is the
            # forward's only (a recomputation restores it itself).
            with sync, attention_implementation(model, attention):
                with accelerator.autocast():
                    loss = self.builder.method.loss(model, tensors, self.shape)
                    loss = loss * (mb.scale * world / n_targets)
                accelerator.backward(loss)
            step_loss += loss.detach() / world
            if mb.scale:
                tokens += tensors["attention_mask"].sum() + (
                    0 if causal else (tensors["labels"] != IGNORE).sum()
                )
        if self.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(accelerator.reduce(step_loss, "sum")), int(accelerator.reduce(tokens, "sum")), n_targets

    def train_epoch(self, epoch: int) -> None:
        """Stage ``epoch``'s steps (from where a resumed run stopped), logged, checkpointed every
        ``save_every`` steps."""
        state, steps_per_epoch = self.state, self.steps_per_epoch
        examples, batches = self._stage_batches(epoch)
        if state["step"] == epoch * steps_per_epoch:
            state["epoch_loss"] = [0.0, 0]  # sum and count of step losses in this stage so far
        with self.step_weights(), kept_logit_buffers():  # a chunk's logits in one buffer, step to step
            self._train_steps(epoch, examples, batches)

    def step_weights(self) -> contextlib.AbstractContextManager[None]:
        """The student as training steps see it (:func:`training_step_weights`); dev scoring and
        saving see the student as loaded."""
        return training_step_weights(
            self.model,
            self.precision,
            self.accelerator.device.type,
            self.compiled_forward,
            recompute_elementwise=self.config.recompute_elementwise,
        )

    def _train_steps(self, epoch: int, examples: Sequence[StageExample], batches: list[list[int]]) -> None:
        config, state, steps_per_epoch = self.config, self.state, self.steps_per_epoch
        for position in range(state["step"] - epoch * steps_per_epoch, steps_per_epoch):
            batch = batches[position]
            step_start = time.perf_counter()
            if batch:
                loss_value, n_tokens, n_targets = self.loss_step(examples, batch)
                state["train_tokens"] += n_tokens
                state["target_tokens"] += n_targets
                state["epoch_loss"][0] += loss_value
                state["epoch_loss"][1] += 1
            else:
                loss_value, n_tokens, n_targets = float("nan"), 0, 0
            self.scheduler.step()
            heap = {}
            if self.accelerator.device.type == "cpu":
                trimmed = self.heap.after_step()
                if self.heap.size is not None:  # resident memory at the step's end, before any trim
                    heap = {"rss_mib": round(self.heap.size / 2**20), "heap_trim": trimmed}
            state["step"] += 1
            seconds = time.perf_counter() - step_start
            row = {
                "step": state["step"],
                "epoch": epoch,
                "stage": schedule_stage(epoch),
                "loss": loss_value,
                "lr": self.scheduler.get_last_lr()[0],
                "tokens": n_tokens,
                "targets": n_targets,
                "step_s": seconds,
                "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
                "elapsed_s": time.perf_counter() - self.start_time,
                **heap,
            }
            if self.compile_before is not None and batch:
                # This run's first step in this process compiled the model: say where that time went.
                row["compile"] = compile_stats(since=self.compile_before)
                self.compile_before = None
            self.log.write(row)
            self.bar.update(1)
            self.bar.set_postfix(
                stage=schedule_stage(epoch), loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}"
            )
            at_epoch_end = position == steps_per_epoch - 1
            if config.save_every and state["step"] % config.save_every == 0 and not at_epoch_end:
                self.save_checkpoint()

    def save_checkpoint(self) -> None:
        self.state["seconds"] = time.perf_counter() - self.start_time
        save_checkpoint(
            self.accelerator, self.ckpt_root, self.state["step"], self.state, self.config.keep_checkpoints
        )

    def end_epoch(self, epoch: int) -> None:
        """The stage's mean loss, dev selection, a checkpoint."""
        state = self.state
        loss_sum, loss_steps = state["epoch_loss"]
        if loss_steps:
            state["stage_loss"] = state["stage_loss"][:epoch] + [loss_sum / loss_steps]
        if self.dev and self.config.select == "dev" and self.eligible(epoch):
            self.select_on_dev(epoch)
        self.save_checkpoint()

    def eligible(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` trained whole rationales (stage T or later for a progressive
        method) and is not before ``select_from_epoch``, so that its model may be kept."""
        if epoch + 1 < self.config.select_from_epoch:
            return False
        if not self.builder.method.progressive:
            return True
        return schedule_stage(epoch) >= self.builder.inputs.stages

    def select_on_dev(self, epoch: int) -> None:
        """Dev accuracy after epoch ``epoch``; the best epoch's trainable weights are kept (the
        later of equal ones: it trained longer on whole rationales)."""
        accelerator, state = self.accelerator, self.state
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)
            summary = _evaluate(
                unwrapped,
                self.student,
                self.dev,
                self.config,
                self.fmt,
                self.builder.method.eval_prefix,
                None,
            )
            entry = {"epoch": epoch, "accuracy": summary["accuracy"], "ci95": summary["ci95"]}
            state["dev"] = [d for d in state["dev"] if d["epoch"] < epoch] + [entry]
            self.bar.write(
                f"epoch {epoch} (stage {schedule_stage(epoch)}): dev accuracy {summary['accuracy']:.1f} %"
            )
            if state["best_accuracy"] is None or summary["accuracy"] >= state["best_accuracy"]:
                from safetensors.torch import save_file

                state["best_accuracy"], state["best_epoch"] = summary["accuracy"], epoch
                save_file(_trainable_state(unwrapped), str(self.best_path) + ".tmp")
                Path(str(self.best_path) + ".tmp").replace(self.best_path)
        accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        """The kept stage's weights restored, the test split scored (also the last stage's model
        when dev selection kept an earlier one and ``test_last_epoch``), the student saved."""
        config, state, accelerator = self.config, self.state, self.accelerator
        self.bar.close()
        self.log.close()
        seconds = state["seconds"]
        unwrapped = accelerator.unwrap_model(self.model)

        def score_test(predictions: str) -> dict[str, Any]:
            return _evaluate(
                unwrapped,
                self.student,
                self.test,
                config,
                self.fmt,
                self.builder.method.eval_prefix,
                self.output / predictions,
            )

        kept_earlier = state["best_epoch"] is not None and state["best_epoch"] != config.epochs - 1
        test_last = None
        if self.test and config.test_last_epoch and kept_earlier and accelerator.is_main_process:
            test_last = score_test("test_predictions_last.jsonl")
        if state["best_epoch"] is not None and self.best_path.exists():
            from safetensors.torch import load_file

            best = load_file(str(self.best_path))
            with torch.no_grad():
                for name, param in unwrapped.named_parameters():
                    if name in best:
                        param.copy_(best[name].to(param.device, param.dtype))
        result = TrainResult(
            method=config.method,
            steps=state["step"],
            epochs=config.epochs,
            train_tokens=state["train_tokens"],
            target_tokens=state["target_tokens"],
            seconds=round(seconds, 1),
            tokens_per_s=round(state["train_tokens"] / seconds, 1) if seconds else 0.0,
            skipped_too_long=self.skipped,
            processes=self.world,
            precision=self.precision,
            stage_loss=state["stage_loss"],
            dev=state["dev"],
            best_epoch=state["best_epoch"],
        )
        if accelerator.is_main_process:
            if self.test:
                summary = score_test("test_predictions.jsonl")
                result.test = summary
                if config.test_last_epoch:
                    result.test_last = test_last if kept_earlier else summary
            student_dir = _save_student(
                unwrapped, self.student.tokenizer, self.output / "student", config.merge_lora
            )
            result.student_dir = str(student_dir)
            write_json(self.output / "training.json", asdict(result))
        accelerator.wait_for_everyone()
        return result


def _save_student(model: Any, tokenizer: Any, directory: Path, merge: bool) -> Path:
    """``save_pretrained`` into ``directory`` atomically (a temporary directory renamed)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if merge and hasattr(model, "merge_and_unload"):
        to_save = model.merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)
    return directory


def schedule_stage(epoch: int) -> int:
    """The schedule's stage that epoch ``epoch`` (counted from 0) trains: t = epoch + 1 (the paper
    trains stage t in epoch t, t = 1..T)."""
    return epoch + 1
