"""How fast is the kpod loop? Training tokens/s of kpod and std-cot in our loop, today's settings
against the former ones ("old": the loss from every position's logits, LoRA dropout 0.05), and of
TRL's SFTTrainer, side by side in one run; evaluation in fp32 (today's) against bf16 weights and a
larger batch, with the answers that change; the machine's own bf16 matrix-product rate (and the rate
in the precision the loop ran in, where that is not bf16), for the share of it the loop achieves.

    .venv/bin/python benchmarks/throughput.py                      # the offline student, CPU
    .venv/bin/python benchmarks/throughput.py --student meta-llama/Llama-2-7b-hf --steps 30   # GPU

Same model (LoRA on all linear layers, r 16), same GSM8K rationales, same batch, maximum length
and precision for the three trainers. Throughput counts real (non-padding) tokens of every step
after the first (warm-up) and divides by the time of those steps; for TRL (two epochs, the second
timed) the step times come from a trainer callback. Each training row runs in a fresh Python process
(:func:`fresh_process`) and reports that process's peak: resident memory on CPU (``ru_maxrss``),
allocated memory on GPU. In one shared process a row's resident memory kept what earlier rows had
left on the heap: the checkpointed variant showed 3.5 GB run after the others and 2.1-2.4 GB on its
own. The evaluation rows share one process and one loaded model; their peaks are sampled.
Results: results/throughput.json (keys new_over_old_stdcot, new_over_old_kpod, kpod_over_stdcot,
ours_over_trl, mfu_bf16, peak_rss_new_over_old, eval_new_over_old plus the raw figures; mfu is the
share of the rate in the loop's own precision, which ``--precision auto`` makes fp32 on a CPU without
fast bf16 products); a run with
``--train-rows`` (some training variants) or ``--eval-rows`` (some evaluation settings) is stored under
``train_rows`` / ``eval_rows`` and leaves those figures as they were.

Achieved FLOP/s counts, per real token, 2 x (the student's non-embedding parameters) for the
forward and as much again for the activations' gradients (LoRA: the frozen weights get none); the
adapters' own products, 6 x their parameters (forward, input and weight gradients); causal
attention's scores and weighted sum, 6 x hidden x layers x L per token of an example of length L
(half the square the eager kernel computes: what the model needs, not what padding or the mask
waste); plus 4 x hidden x vocabulary per labelled token for the output projection and its
gradient. Sessions 11-35 left attention and the adapters out ("a few per cent"); at GSM8K's
lengths they add about a tenth, so the former count is kept beside it (``gflop_per_s_dense``,
``mfu_bf16_dense``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, fixed_heap_trimmer, provenance  # noqa: E402

# The former settings, kept so the ratios are measured side by side on the same machine.
VARIANTS = {
    # micro_batch_size "batch": one forward pass per optimiser step
    "old": {
        "loss_from_hidden": False,
        "lora_dropout": 0.05,
        "attention": "sdpa",
        "micro_batch_size": "batch",
        "recompute_elementwise": False,
    },
    "new": {},  # the library's defaults
    "new-sdpa": {"attention": "sdpa"},  # PyTorch's flash attention in every step (before session 27)
    "new-dropout0.05": {"lora_dropout": 0.05},  # LoRA dropout's own cost, today's code otherwise
    "new-packing": {"packing": True},  # packed rows instead of length-grouped padded batches
    "new-compile": {"compile": True},  # torch.compile of the training forward (train.compile)
    "new-gc": {"gradient_checkpointing": True},  # activations recomputed in the backward (memory)
    # The batch in one forward pass (the default before session 35), or in passes of 4 or 2 (gradient
    # accumulation; the loss is the same): the default micro_batch_size "auto" splits on a CPU.
    "new-whole": {"micro_batch_size": "batch"},
    "new-micro4": {"micro_batch_size": 4},
    "new-micro2": {"micro_batch_size": 2},
    # The defaults in a process that preloads a fast allocator, as `make demo` does where one is
    # installed (kpod.allocator); skipped where none is.
    "new-jemalloc": {"allocator": True},
    # jemalloc keeping the pages it frees (its default hands them back after 10 s, about two steps),
    # never purged; or purged by the trainer's rule (kpod.allocator.HeapTrimmer: when the resident
    # memory at a step's end has grown past 1.5x, or 1.2x, the first step's)
    "new-jemalloc-retain": {
        "allocator": True,
        "malloc_conf": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
        "trim": "never",
    },
    "new-jemalloc-retain-purge": {"allocator": True, "malloc_conf": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    "new-jemalloc-retain-purge1.2": {
        "allocator": True,
        "malloc_conf": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
        "trim_growth": 1.2,
    },
    # retained pages in one arena for all threads (are the retained pages spread over arenas?)
    "new-jemalloc-retain-1arena": {
        "allocator": True,
        "malloc_conf": "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:1",
        "trim": "never",
    },
    # jemalloc without its arena for allocations of 8 MiB and more (the guess tested in session 39:
    # that arena's eager purging made jemalloc's rows slower; it did not, BENCHMARKS.md)
    "new-jemalloc-nohuge": {"allocator": True, "malloc_conf": "oversize_threshold:0"},
    # PyTorch's CPU allocations of 2 MiB and more on transparent huge pages (THP_MEM_ALLOC_ENABLE: 2
    # MiB-aligned, madvise(MADV_HUGEPAGE)), under glibc's malloc and under jemalloc (session 39: no
    # gain under glibc, slower under jemalloc; not adopted)
    "new-thp": {"env": {"THP_MEM_ALLOC_ENABLE": "1"}},
    "new-jemalloc-thp": {"allocator": True, "env": {"THP_MEM_ALLOC_ENABLE": "1"}},
    # The heap trim (kpod.allocator.release_freed_memory) after every step (the default before
    # session 35) or never, instead of the default's trim on growth (kpod.allocator.HeapTrimmer),
    # under glibc's malloc and under a fast allocator.
    "new-trim-always": {"trim": "always"},
    "new-notrim": {"trim": "never"},
    "new-jemalloc-notrim": {"allocator": True, "trim": "never"},
    # The least memory the library offers: activation checkpointing under a fast allocator.
    "new-gc-jemalloc": {"gradient_checkpointing": True, "allocator": True},
    # Session 38's two changes, each turned off in the measuring process: every projection casting
    # a norm's output itself (no kpod.models.norm_casts_shared), and the float32 weights' file
    # pages kept resident beside their bf16 copies (no kpod.allocator.FilePages advice).
    "new-casts-per-reader": {"allocator": True, "undo": "norm_casts_shared"},
    "new-pages-kept": {"allocator": True, "undo": "file_pages"},
    # Session 39's: the tied embedding's float32 pages kept after the output projection's bf16 cast
    # (kpod.models.cast_once hands them back otherwise).
    "new-head-pages-kept": {"allocator": True, "undo": "cast_pages"},
    # Session 40's: attention's softmax and the MLP's activation kept for the backward pass instead
    # of recomputed there (train.recompute_elementwise false), under jemalloc and under glibc.
    "new-activations-kept": {"allocator": True, "recompute_elementwise": False},
    "new-glibc-activations-kept": {"recompute_elementwise": False},
    # Session 41's: a chunk's logits allocated afresh per chunk, with the fused
    # log_softmax(..., dtype=float32), instead of kpod.chunked_loss.LogitBuffers kept from step to
    # step, under glibc and under jemalloc.
    "new-fresh-logits": {"undo": "logit_buffers"},
    "new-jemalloc-fresh-logits": {"allocator": True, "undo": "logit_buffers"},
    # glibc's malloc with fixed thresholds (its dynamic ones off): blocks up to 32 MiB from the heap,
    # whose free top is handed back only past 4 GiB, so a step's freed activations are reused
    # instead of faulted in again (a session 40 probe).
    "new-glibc-fixed-thresholds": {
        "env": {
            "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
        }
    },
}
STUDENT_SETTINGS = ("lora_dropout", "gradient_checkpointing")  # StudentConfig's, not TrainConfig's
# Set on the measuring process (fresh_process), not on kpod.
PROCESS_SETTINGS = ("allocator", "trim", "trim_growth", "malloc_conf", "undo", "env")
BATCH_SETTINGS = ("micro_batch_size",)  # TrainConfig's; "batch" stands for --batch-size


class PeakMemory:
    """Peak resident memory (MiB) while the block runs: sampled RSS on CPU, CUDA's own counter on GPU."""

    def __enter__(self) -> PeakMemory:
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        import torch

        self.stop.set()
        self.thread.join()
        self.mib = round((torch.cuda.max_memory_allocated() if self.cuda else self.peak) / 2**20, 1)


def load_data(n: int, tokenizer, max_length: int):
    from kpod.data.loaders import load_examples
    from kpod.data.synthetic import gsm_symbolic_examples
    from kpod.prompt import render_example

    path = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if path.exists():
        examples, _ = load_examples(path)
        source = str(path)
    else:
        examples, source = gsm_symbolic_examples(n * 2, seed=0)[0], "reasoning-gym gsm_symbolic"
    fitting = [
        e
        for e in examples
        if len(tokenizer(render_example(e, tokenizer=tokenizer).text).input_ids) <= max_length
    ]
    return fitting[:n], source


def matmul_rate(precision: str = "bf16", seconds: float = 3.0, n: int = 2048) -> float:
    """GFLOP/s of ``n x n`` matrix products in ``precision`` (bf16 or fp32) on this machine, as
    many as fit in ``seconds`` after one warm-up product (at least one: a bf16 product takes
    seconds on a CPU without fast bf16, BENCHMARKS.md "session 32")."""
    import torch

    from kpod.models import torch_dtype

    dtype = torch_dtype(precision)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def training_flops(student: str, examples: list, lora_r: int) -> dict[str, float]:
    """FLOPs of a training step (module docstring): per real token, ``dense`` (the projections'
    products), ``attention`` (scores and their weighted sum, averaged over ``examples``' lengths)
    and ``adapters`` (the LoRA products); per labelled token, ``head`` (the output projection)."""
    from transformers import AutoConfig

    from kpod.models import load_tokenizer, resolve_model_path
    from kpod.prompt import render_example

    config = AutoConfig.from_pretrained(resolve_model_path(student))
    d, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    inter = config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    adapted = (d + d) * 2 + (d + kv) * 2 + (d + inter) * 3  # in + out of each adapted projection
    tok = load_tokenizer(student)
    lengths = [len(tok(render_example(e, tokenizer=tok).text).input_ids) for e in examples]
    # causal attention: a token at position t reads t keys, 4 d t FLOPs forward (scores and sum),
    # twice that backward: 6 d L^2 per example and layer, spread over its L tokens
    pairs_per_token = sum(n * n for n in lengths) / max(sum(lengths), 1)
    return {
        "dense": 4.0 * layers * per_layer,
        "attention": 6.0 * d * layers * pairs_per_token,
        "adapters": 6.0 * lora_r * layers * adapted,
        "head": 4.0 * d * vocab,
    }


def ours(method: str, args, examples, out: Path, variant: str = "new") -> dict:
    from kpod.distill.trainer import TrainConfig
    from kpod.models import StudentConfig, load_tokenizer
    from kpod.pipeline import distill_student
    from kpod.progressive.schedule import ScheduleConfig, plan_schedule
    from kpod.weighting.weights import TokenWeights, rationale_key

    tokenizer = load_tokenizer(args.student)
    weights = inputs = None
    if method == "kpod":
        # Throughput does not depend on the values: weights 0.5 everywhere, a schedule over step counts.
        weights = {}
        for e in examples:
            enc = tokenizer(e.rationale, add_special_tokens=False, return_offsets_mapping=True)
            weights[rationale_key(e)] = TokenWeights(
                key=rationale_key(e),
                qid=e.qid,
                offsets=[tuple(o) for o in enc["offset_mapping"]],
                weights=[0.5] * len(enc["input_ids"]),
            )
        plan = plan_schedule(
            [[1.0] * len(e.steps) for e in examples],
            [0] * len(examples),
            ScheduleConfig(stages=2, n_clusters=1),
        )
        inputs = {rationale_key(e): plan.c[i].tolist() for i, e in enumerate(examples)}
    settings = VARIANTS[variant]
    train_settings = {
        k: v for k, v in settings.items() if k not in STUDENT_SETTINGS + PROCESS_SETTINGS + BATCH_SETTINGS
    }
    student_settings = {k: v for k, v in settings.items() if k in STUDENT_SETTINGS}
    # Two epochs (T = 2): kpod's first epoch trains schedule stage 1 (part of each rationale as
    # input), its second whole rationales, as in a real run; every method gets the same steps.
    micro = settings.get("micro_batch_size")
    if micro is not None:
        train_settings["micro_batch_size"] = args.batch_size if micro == "batch" else micro
    config = TrainConfig(
        **train_settings,
        method=method,
        epochs=2,
        batch_size=args.batch_size,
        max_length=args.max_length,
        precision=args.precision,
        select="last",
        keep_checkpoints=1,
        lr=1e-4,
    )
    if "trim" in settings:  # a fixed rule in place of the trainer's; this process is the row's own
        import kpod.distill.trainer

        kpod.distill.trainer.HeapTrimmer = fixed_heap_trimmer(settings["trim"] == "always")
    if "trim_growth" in settings:  # the trainer's rule with another growth factor
        import functools

        import kpod.distill.trainer

        growth = settings["trim_growth"]
        kpod.distill.trainer.HeapTrimmer = functools.partial(kpod.distill.trainer.HeapTrimmer, growth=growth)
    if settings.get("undo") == "norm_casts_shared":
        import contextlib

        import kpod.distill.trainer

        kpod.distill.trainer.norm_casts_shared = lambda model, dtype: contextlib.nullcontext(0)
    if settings.get("undo") == "cast_pages":
        import kpod.models

        kpod.models._release_file_pages = lambda tensor: 0
    if settings.get("undo") == "logit_buffers":  # the fused path, as off a CPU (nothing is kept)
        import kpod.chunked_loss

        kpod.chunked_loss._buffers = lambda *args: None
    if settings.get("undo") == "file_pages":
        import kpod.allocator

        kpod.allocator.FilePages.release = lambda self, tensor: 0
    distill_student(
        config,
        StudentConfig(name=args.student, **student_settings),
        examples,
        out,
        weights=weights,
        inputs=inputs,
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first, rows = rows[0], rows[1:]  # the first step warms up (and compiles)
    first_step_s = first["step_s"]
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["step_s"] for r in rows)
    flops = training_flops(args.student, examples, student_settings.get("lora_r", StudentConfig().lora_r))
    per_token = flops["dense"] + flops["attention"] + flops["adapters"]
    labelled = sum(r["targets"] for r in rows)
    return {
        "variant": variant,
        "tokens_per_s": round(tokens / seconds, 1),
        "gflop_per_s": round((per_token * tokens + flops["head"] * labelled) / seconds / 1e9, 1),
        # the count of sessions 11-35: projections and head only
        "gflop_per_s_dense": round((flops["dense"] * tokens + flops["head"] * labelled) / seconds / 1e9, 1),
        "labelled_tokens": labelled,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "steps": len(rows),
        "first_step_s": round(first_step_s, 2),
        **({"first_step_compile": first["compile"]} if "compile" in first else {}),
        # the heap trims (or jemalloc purges) of the trainer's rule, and the resident MiB at each
        # step's end before any trim
        "heap_trims": sum(bool(r.get("heap_trim")) for r in [first, *rows]),
        "rss_mib_steps": [r["rss_mib"] for r in [first, *rows] if "rss_mib" in r],
    }


def baselines(args) -> dict:
    """Throughput rows of the paper's baselines against std-cot, on ASDiv questions with two or
    more gpt-3.5 rationales (MCC-KD puts two rationales of each question through the model per
    item; SCoTD one, drawn anew each epoch): real tokens/s and questions/s, today's settings."""
    from kpod.data.loaders import load_examples
    from kpod.models import load_tokenizer
    from kpod.prompt import render_example

    tok = load_tokenizer(args.student)
    path = ROOT.parent / "shared" / "data" / "asdiv-gpt35" / "train.json"
    loaded, _ = load_examples(path)
    by_question: dict[str, list] = {}
    for e in loaded:
        if e.steps and len(tok(render_example(e, tokenizer=tok).text).input_ids) <= args.max_length:
            by_question.setdefault(e.qid, []).append(e)
    chosen = [q for q in by_question.values() if len(q) >= 2][: args.steps * args.batch_size]
    several = [e for q in chosen for e in q]  # every rationale of the chosen questions
    first = [q[0] for q in chosen]  # std-cot: one rationale per question
    rows: dict = {"data": str(path), "questions": len(chosen), "rationales": len(several)}
    for method, examples in (("std-cot", first), ("scotd", several), ("mcc-kd", several)):
        measured = fresh_process("ours", args, examples, args.out / f"baseline-{method}", method=method)
        steps = measured["steps"]
        measured["questions_per_s"] = round(steps * args.batch_size / measured["seconds"], 3)
        rows[method] = measured
        print("baseline", method, measured, flush=True)
    for method in ("scotd", "mcc-kd"):
        key = method.replace("-", "")
        rows[f"{key}_over_stdcot_tokens"] = round(
            rows[method]["tokens_per_s"] / rows["std-cot"]["tokens_per_s"], 3
        )
        rows[f"{key}_over_stdcot_questions"] = round(
            rows[method]["questions_per_s"] / rows["std-cot"]["questions_per_s"], 3
        )
    return rows


def trl_sft(args, examples, out: Path, compile: bool = False, micro: int | None = None) -> dict:
    """TRL's SFTTrainer on the same data and LoRA settings, two epochs, timed over the second only
    (every batch shape has been seen, so ``compile``'s graphs are all built by then). ``micro``:
    forward passes of that many examples with gradient accumulation up to the batch, as our
    ``micro_batch_size: auto`` splits a batch on a CPU (so TRL gets the same chance)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kpod.models import load_model
    from kpod.prompt import render_example

    loaded = load_model(args.student)
    tok = loaded.tokenizer
    rows = []
    for e in examples:
        r = render_example(e, tokenizer=tok)
        rows.append({"prompt": r.text[: r.prompt.end], "completion": r.text[r.prompt.end :]})
    data = datasets.Dataset.from_list(rows)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro or args.batch_size,
        gradient_accumulation_steps=args.batch_size // (micro or args.batch_size),
        num_train_epochs=2,
        torch_compile=compile,
        learning_rate=1e-4,
        max_length=args.max_length,
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        completion_only_loss=True,
        dataloader_num_workers=0,
        seed=0,
        lr_scheduler_type="linear",
        # TRL's fastest CPU setting: its SFTConfig turns activation checkpointing on by default (a
        # second forward per step); padding-free batches need FlashAttention (a GPU), so not here.
        gradient_checkpointing=False,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=loaded.model,
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora,
        callbacks=[timer],
    )
    # Real tokens per step, counted from the tokenized dataset in the trainer's own batch order.
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_example = sum(lengths) / len(lengths)
    measured = timer.times[len(timer.times) // 2 :]  # the second epoch
    tokens = per_example * args.batch_size * len(measured)
    return {
        "tokens_per_s": round(tokens / sum(measured), 1),
        "tokens": int(tokens),
        "seconds": round(sum(measured), 2),
        "steps": len(measured),
        "first_step_s": round(timer.times[0], 2),
        "torch_compile": compile,
        "micro_batch_size": micro or args.batch_size,
        "trl_version": __import__("trl").__version__,
    }


MEASUREMENTS = {"ours": ours, "trl": trl_sft}  # what fresh_process can run, by name


def fresh_process(kind: str, args, examples: list, out: Path, **params) -> dict:
    """``MEASUREMENTS[kind](args=args, examples=examples, out=out, **params)`` run in a child Python
    process, its result with ``peak_mib``: the child's peak resident memory (CPU) or peak allocated
    memory (GPU), student loading included (its peak is below training's). Why a fresh process: RSS
    never gives back what a process's heap keeps, so rows measured one after another in one process
    each carried their predecessors' leftovers (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.pkl"
    job.write_bytes(pickle.dumps({"kind": kind, "args": vars(args), "examples": examples, "params": params}))
    env, settings = dict(os.environ), VARIANTS.get(params.get("variant", "new"), {})
    if settings.get("allocator"):
        from kpod.allocator import find_fast_allocator

        env["LD_PRELOAD"] = str(find_fast_allocator())
    if settings.get("malloc_conf"):
        env["MALLOC_CONF"] = settings["malloc_conf"]
    env.update(settings.get("env", {}))
    done = subprocess.run([sys.executable, __file__, "--child", str(job)], check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"the {kind} measurement {params} failed (exit {done.returncode}); its output is above"
        )
    return json.loads((out / "measured.json").read_text())


def child(job_path: Path) -> None:
    """The child side of :func:`fresh_process`: run the job, write its result beside it."""
    import resource

    import torch

    from kpod.allocator import current_allocator

    job = pickle.loads(job_path.read_bytes())
    out = job_path.parent
    measured = MEASUREMENTS[job["kind"]](
        args=argparse.Namespace(**job["args"]), examples=job["examples"], out=out, **job["params"]
    )
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    measured["peak_mib"] = round(peak / 2**20, 1)
    measured["allocator"] = current_allocator()
    # The whole process's page faults and kernel share of its CPU time (loading included): where an
    # allocator hands memory back and faults it in again, both grow.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    measured["minor_faults"] = usage.ru_minflt
    measured["system_share"] = round(usage.ru_stime / (usage.ru_utime + usage.ru_stime), 3)
    (out / "measured.json").write_text(json.dumps(measured))


def evaluation(args, examples) -> dict:
    """Greedy evaluation of --eval-student (default: the untrained student) on --eval-n questions:
    today's setting (fp32, --eval-batch-size, ``model.generate``) against kpod.evaluate's own
    greedy loop (``-compact``: finished sequences leave the batch, which is refilled from the next
    prompts, with a KV cache grown in place) in fp32 and bf16 weights, at session 12's batch (twice
    --eval-batch-size) and at --eval-new-batch-size, each with its tokens/s and the number of
    answers that differ from today's; a ``-drop0`` row drops each finished sequence from the batch
    as it ends (the loop before ``kpod.evaluate.DROP_FINISHED_SHARE``); ``default`` is what
    ``kpod eval`` does without options (precision and batch size ``auto``: the precision measured
    here once and cached, the batch from :func:`kpod.kv_cache.auto_batch_size`; the ones used are in
    its row), and it is the ``new`` of ``eval_new_over_old``."""
    from contextlib import nullcontext
    from unittest.mock import patch

    import kpod.evaluate as kpod_evaluate
    from kpod.evaluate import evaluate
    from kpod.models import load_model

    loaded = load_model(args.eval_student or args.student, trainable=False)
    questions = examples[: args.eval_n]
    out: dict = {"student": args.eval_student or args.student}
    b = args.eval_batch_size
    big = args.eval_new_batch_size
    today = f"fp32-b{b}"
    # (precision, batch, compact, drop share): "-drop0" drops each finished row as it ends, as the
    # loop did before kpod.evaluate.DROP_FINISHED_SHARE.
    settings = {
        today: ("fp32", b, False, None),
        f"fp32-b{big}-compact": ("fp32", big, True, None),
        f"bf16-b{2 * b}-compact": ("bf16", 2 * b, True, None),
        f"bf16-b{big}-compact": ("bf16", big, True, None),
        f"bf16-b{big}-compact-drop0": ("bf16", big, True, 0.0),
        "default": ("auto", "auto", True, None),
    }
    rows = [
        today,
        *(name for name in settings if name != today and (not args.eval_rows or name in args.eval_rows)),
    ]
    answers = {}
    for name in rows:
        prec, batch, compact, share = settings[name]
        with (
            patch.object(kpod_evaluate, "DROP_FINISHED_SHARE", share) if share is not None else nullcontext(),
            PeakMemory() as mem,
        ):
            result = evaluate(
                loaded.model,
                loaded.tokenizer,
                questions,
                kind=loaded.kind,
                batch_size=batch,
                max_new_tokens=args.eval_max_new_tokens,
                progress=False,
                precision=prec,
                compact=compact,
            )
        answers[name] = [p["predicted"] for p in result.predictions]
        out[name] = {
            "tokens_per_s": round(result.generated_tokens / result.seconds, 1),
            "seconds": round(result.seconds, 1),
            "generated_tokens": result.generated_tokens,
            "accuracy": round(100 * result.accuracy, 2),
            "peak_mib": mem.mib,
            "precision": result.precision,
            "batch_size": result.batch_size,
        }
        print("eval", name, out[name], flush=True)
    for name in answers:
        out[name]["answers_changed"] = sum(x != y for x, y in zip(answers[name], answers[today], strict=True))
    out["questions"] = len(questions)
    out["today"] = today
    if "default" in out:  # the library's default among the rows: its speed-up over today's
        out["new"] = "default"
        out["new_over_today"] = round(out["default"]["tokens_per_s"] / out[today]["tokens_per_s"], 3)
    return out


METHOD_KEYS = (("std-cot", "stdcot"), ("kpod", "kpod"))  # a method and its name in result keys


def training_ratios(result: dict) -> dict:
    """The training figures the issue asks for, from the measured variants' cells in ``result``:
    speed ratios (tokens/s), peak-memory ratios (the larger of the two methods' peaks) and the
    share of the bf16 matrix-product rate."""

    def speed(variant: str, method: str) -> float:
        return result[variant][method]["tokens_per_s"]

    def peak(variant: str) -> float:
        return max(cell["peak_mib"] for cell in result[variant].values())

    def mfu(variant: str, rate: str = "matmul_bf16_gflop_per_s", count: str = "gflop_per_s") -> float:
        return round(result[variant]["std-cot"][count] / result[rate], 3)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    def compare(name: str, variant: str, baseline: str) -> None:
        """``{name}_{method key}``: each method's speed of ``variant`` over ``baseline``'s;
        ``peak_rss_{name}``: their peaks' ratio."""
        for method, key in METHOD_KEYS:
            out[f"{name}_{key}"] = ratio(speed(variant, method), speed(baseline, method))
        out[f"peak_rss_{name}"] = ratio(peak(variant), peak(baseline))

    old = "old" in result
    out = {"kpod_over_stdcot": ratio(speed("new", "kpod"), speed("new", "std-cot")), "mfu_bf16": mfu("new")}
    # The share of the rate in the precision the loop ran in: on a CPU without fast bf16 the loop
    # runs in fp32 (precision auto) and its share of the bf16 rate says nothing.
    out["mfu"] = mfu("new", "matmul_gflop_per_s")
    out["mfu_bf16_dense"] = mfu("new", count="gflop_per_s_dense")  # the count before session 36
    if old:
        compare("new_over_old", "new", "old")
    if "new-compile" in result:  # the opt-in train.compile
        for method, key in METHOD_KEYS:
            if old:
                out[f"compile_over_old_{key}"] = ratio(speed("new-compile", method), speed("old", method))
            out[f"compile_over_new_{key}"] = ratio(speed("new-compile", method), speed("new", method))
        out["peak_rss_compile_over_old"] = ratio(peak("new-compile"), peak("old")) if old else None
        out["mfu_bf16_compile"] = mfu("new-compile")
        out["mfu_compile"] = mfu("new-compile", "matmul_gflop_per_s")
    if "new-gc" in result and old:
        out["peak_rss_gc_over_old"] = ratio(peak("new-gc"), peak("old"))
        out["gc_over_new_stdcot"] = ratio(speed("new-gc", "std-cot"), speed("new", "std-cot"))
    if "new-jemalloc" in result:
        if old:
            out["peak_rss_jemalloc_over_old"] = ratio(peak("new-jemalloc"), peak("old"))
        out["jemalloc_over_new_stdcot"] = ratio(speed("new-jemalloc", "std-cot"), speed("new", "std-cot"))
    if "new-jemalloc" in result and "new-casts-per-reader" in result:  # both under jemalloc
        compare("shared_casts_over_per_reader", "new-jemalloc", "new-casts-per-reader")
    if "new-jemalloc" in result and "new-pages-kept" in result:
        out["peak_rss_pages_released_over_kept"] = ratio(peak("new-jemalloc"), peak("new-pages-kept"))
    if "new-jemalloc" in result and "new-head-pages-kept" in result:
        kept = peak("new-head-pages-kept")
        out["peak_rss_head_pages_released_over_kept"] = ratio(peak("new-jemalloc"), kept)
    if "new-jemalloc" in result and "new-activations-kept" in result:  # both under jemalloc
        compare("recomputed_over_kept", "new-jemalloc", "new-activations-kept")
    if "new-jemalloc" in result:  # jemalloc keeping freed pages (and purging them on growth)
        for variant in [v for v in result if v.startswith("new-jemalloc-retain")]:
            name = variant.removeprefix("new-jemalloc-").replace("-", "_").replace(".", "")
            compare(f"{name}_over_jemalloc", variant, "new-jemalloc")
    if "new-fresh-logits" in result:
        compare("logit_buffers_over_fresh", "new", "new-fresh-logits")
    if "new-jemalloc" in result and "new-jemalloc-fresh-logits" in result:
        compare("logit_buffers_over_fresh_jemalloc", "new-jemalloc", "new-jemalloc-fresh-logits")
    if "new-glibc-activations-kept" in result:
        compare("recomputed_over_kept_glibc", "new", "new-glibc-activations-kept")
    if "new-gc-jemalloc" in result:
        if old:
            out["peak_rss_gc_jemalloc_over_old"] = ratio(peak("new-gc-jemalloc"), peak("old"))
        out["gc_jemalloc_over_new_stdcot"] = ratio(
            speed("new-gc-jemalloc", "std-cot"), speed("new", "std-cot")
        )
    return out


def store_part(key: str, value: dict) -> None:
    """``value`` under ``key`` of results/throughput.json, the rest of the file as it was (the
    partial runs: --baselines, --eval-rows, --train-rows)."""
    path = RESULTS / "throughput.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result[key] = value
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="smollm2-135m-instruct")
    parser.add_argument(
        "--steps",
        type=int,
        default=6,
        help="optimiser steps per epoch (two epochs; the first step is warm-up)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32", "fp16"),
        default="auto",
        help="of the training rows (auto: bf16 where this machine has fast bf16 products, fp32 "
        "elsewhere, as kpod's own default; kpod.precision.compute_precision)",
    )
    parser.add_argument("--eval-n", type=int, default=32, help="questions for the evaluation comparison")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--eval-new-batch-size", type=int, default=128, help="the evaluation rows' large batch"
    )
    parser.add_argument("--eval-student", help="a trained student's directory for the evaluation rows")
    parser.add_argument(
        "--eval-rows",
        nargs="+",
        help="only these evaluation rows (names as in results/throughput.json), beside today's fp32 "
        "row; with --eval-only the rows are stored under eval_rows (or --eval-key), the full "
        "evaluation's left as they were",
    )
    parser.add_argument(
        "--eval-key",
        default="eval_rows",
        help="with --eval-rows --eval-only, the results file's key for the rows (eval_rows_trained: "
        "a trained student's, beside the untrained student's eval_rows)",
    )
    parser.add_argument(
        "--eval-file", type=Path, help="questions for the evaluation rows (any format kpod reads)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of std-cot and kpod")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--eval-only", action="store_true", help="only the evaluation rows")
    parser.add_argument(
        "--baselines", action="store_true", help="only the rows of scotd and mcc-kd against std-cot (ASDiv)"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS), help="settings compared"
    )
    parser.add_argument(
        "--train-rows",
        action="store_true",
        help="a comparison of some training variants (--variants), stored under train_rows of the "
        "results file; the full run's figures (and their ratios at the top level) stay as they were",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-throughput")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # fresh_process's job file
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    from kpod.precision import compute_precision

    requested = args.precision
    args.precision = compute_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    if "new" not in args.variants:
        parser.error("--variants must include new: every ratio is taken against it")
    needs_allocator = [v for v in args.variants if VARIANTS[v].get("allocator")]
    if needs_allocator:
        from kpod.allocator import find_fast_allocator

        if find_fast_allocator() is None:
            print(
                f"no jemalloc, tcmalloc or mimalloc installed: {', '.join(needs_allocator)} skipped",
                file=sys.stderr,
            )
            args.variants = [v for v in args.variants if v not in needs_allocator]
    started = provenance()
    if args.baselines:  # only the baselines' rows, added to the existing results file
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
        measured = {**started, **baselines(args)}
        store_part("baselines", measured)
        print(json.dumps({k: v for k, v in measured.items() if "_over_" in k}))
        return
    if args.eval_only:  # only the evaluation rows, added to the existing results file
        from kpod.models import load_tokenizer

        if args.eval_file:
            from kpod.data.loaders import load_examples

            questions = load_examples(args.eval_file)[0][: args.eval_n]
        else:
            questions, _ = load_data(args.eval_n, load_tokenizer(args.student), args.max_length)
        if args.eval_rows:  # a comparison of some rows: kept apart from the full evaluation's figures
            store_part(args.eval_key, {**started, **evaluation(args, questions)})
            return
        path = RESULTS / "throughput.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if "eval" in result and result["eval"].get("student", args.student) == args.student:
            result["eval_untrained"] = result["eval"]  # the untrained student's rows, kept beside
        ev = result["eval"] = {**started, **evaluation(args, questions)}
        result["eval_new_over_old"] = ev["new_over_today"]
        result["eval_answers_changed"] = ev[ev["new"]]["answers_changed"]
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("eval_new_over_old", "eval_answers_changed")}))
        return

    from kpod.models import load_tokenizer

    tok = load_tokenizer(args.student)
    examples, source = load_data(max(args.steps * args.batch_size, args.eval_n), tok, args.max_length)
    eval_questions, examples = examples, examples[: args.steps * args.batch_size]
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    result: dict = {
        **started,
        "data": source,
        "examples": len(examples),
        "student": args.student,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": args.precision,
        "precision_requested": requested,
        "lora_r": 16,
    }
    # A short unrecorded run first (page faults, thread pools), then the runs alternate for --rounds
    # rounds, the order reversed every other round so that none always runs first; each figure is
    # the mean over rounds.
    # The matrix-product rate before and after the training runs; the higher one is the machine's.
    # The bf16 rate is the reference (mfu_bf16); where the loop runs in another precision
    # that precision's rate is measured too (mfu). Where the loop is not bf16 (a CPU without fast
    # bf16), bf16 products of 2048 take about a minute each: the reference rate is taken on
    # 1024 x 1024 products there.
    measured_in = list(dict.fromkeys(("bf16", args.precision)))
    bf16_n = 2048 if args.precision == "bf16" else 1024

    def rates_now() -> dict[str, float]:
        return {p: round(matmul_rate(p, n=bf16_n if p == "bf16" else 2048), 1) for p in measured_in}

    rates = [rates_now()]
    print("matmul GFLOP/s", rates[0], flush=True)
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    fresh_process("ours", warm, examples[: args.batch_size], args.out / "warm-up", method="std-cot")
    runs = [(m, v) for v in args.variants for m in ("std-cot", "kpod")]
    for method, variant in runs:
        result.setdefault(variant, {})[method] = {"rounds": []}
    for r in range(args.rounds):
        for method, variant in runs if r % 2 == 0 else runs[::-1]:
            out = args.out / f"{variant}-{method}-{r}"
            measured = fresh_process("ours", args, examples, out, method=method, variant=variant)
            result[variant][method]["rounds"].append(measured)
            print(variant, method, r, measured, flush=True)
    for method, variant in runs:
        cell = result[variant][method]
        rounds = cell["rounds"]
        for key in ("tokens_per_s", "gflop_per_s", "gflop_per_s_dense"):
            cell[key] = round(sum(x[key] for x in rounds) / len(rounds), 1)
        cell["peak_mib"] = max(x["peak_mib"] for x in rounds)
    rates.append(rates_now())
    for p in measured_in:
        result[f"matmul_{p}_gflop_per_s_runs"] = [r[p] for r in rates]
    result["matmul_bf16_gflop_per_s"] = max(r["bf16"] for r in rates)
    result["matmul_gflop_per_s"] = max(r[args.precision] for r in rates)  # in the loop's precision
    result["std-cot"], result["kpod"] = result["new"]["std-cot"], result["new"]["kpod"]
    result.update(training_ratios(result))
    if args.train_rows:  # a partial comparison: kept apart from the full run's figures
        store_part("train_rows", result)
        print(json.dumps({k: v for k, v in result.items() if "_over_" in k or k.startswith("mfu")}))
        return
    if not args.skip_trl:
        rows = [fresh_process("trl", args, examples, args.out / "trl")]
        print("trl", rows[-1], flush=True)
        if args.batch_size % 2 == 0:  # the batch in two passes, as ours splits long batches on a CPU
            micro = args.batch_size // 2
            rows.append(fresh_process("trl", args, examples, args.out / "trl-micro", micro=micro))
            print(f"trl micro-batches of {micro}", rows[-1], flush=True)
        if "new-compile" in result:  # TRL compiled too, when ours is
            rows.append(fresh_process("trl", args, examples, args.out / "trl-compile", compile=True))
            print("trl compiled", rows[-1], flush=True)
        result["trl_rows"] = rows
        result["trl"] = max(rows, key=lambda r: r["tokens_per_s"])  # its fastest setting here
        if "new-compile" in result:
            result["ours_compile_over_trl"] = round(
                result["new-compile"]["std-cot"]["tokens_per_s"] / result["trl"]["tokens_per_s"], 3
            )
        # TRL's SFT is std-cot; kpod's own ratio is reported beside it.
        result["ours_over_trl"] = round(result["std-cot"]["tokens_per_s"] / result["trl"]["tokens_per_s"], 3)
        result["kpod_over_trl"] = round(result["kpod"]["tokens_per_s"] / result["trl"]["tokens_per_s"], 3)
    if not args.skip_eval:
        ev = result["eval"] = evaluation(args, eval_questions)
        result["eval_new_over_old"] = ev["new_over_today"]
        result["eval_answers_changed"] = ev[ev["new"]]["answers_changed"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "throughput.json"
    if path.exists():  # rows this run did not measure (evaluation, baselines) stay as they were
        before = json.loads(path.read_text())
        kept = (
            "eval",
            "eval_untrained",
            "eval_new_over_old",
            "eval_answers_changed",
            "eval_rows",
            "eval_rows_trained",
            "baselines",
        )
        result.update({k: before[k] for k in kept if k in before and k not in result})
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result.get(k)
                for k in (
                    "new_over_old_stdcot",
                    "new_over_old_kpod",
                    "kpod_over_stdcot",
                    "ours_over_trl",
                    "mfu_bf16",
                    "mfu",
                    "mfu_bf16_dense",
                    "peak_rss_new_over_old",
                    "eval_new_over_old",
                    "eval_answers_changed",
                    "compile_over_new_stdcot",
                    "compile_over_new_kpod",
                    "mfu_bf16_compile",
                    "ours_compile_over_trl",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
