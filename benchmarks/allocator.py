"""Does the memory allocator change CPU training speed, or results? Three checks, one result file.

    .venv/bin/python benchmarks/allocator.py numerics          # glibc vs jemalloc: same weights?
    .venv/bin/python benchmarks/allocator.py speed --steps 16     # tokens/s and page faults per setting
    .venv/bin/python benchmarks/allocator.py trainlog \
        runs/bench/cpu-small-gsm8k-s1/train-kpod/train_log.jsonl \
        --starts 151,226 --labels glibc,glibc,jemalloc          # tokens/s over a run's sittings

``numerics`` trains a small random Llama for 6 AdamW steps (bf16 autocast, batches of changing
length) in two fresh processes, one under the system malloc and one with the installed jemalloc
(or tcmalloc) preloaded, and compares the final weights' hash and the losses: an allocator must
not change a result. It is not timed: six small steps say nothing of a heap fragmenting over an
hour. ``trainlog`` reads a kpod ``train_log.jsonl`` whose run was killed and resumed (``--starts``:
the first step of each later sitting), and reports real tokens per second per sitting and per
window of steps, labelled with the allocator each sitting ran under (the log does not know).
``speed`` trains the real student for a few steps of the suite's shape (GSM8K rationales up to 512
tokens, batch 8, LoRA, bf16 autocast) in one fresh process per allocator setting (``SETTINGS``),
and reports tokens/s with what the kernel did for it: minor page faults per second and the share
of the process's CPU time spent in the kernel (``getrusage`` around the training only). It asks
whether memory handed back to the OS after every step, and faulted in again (zeroed) by the next,
costs training time: the GSM8K no-weights run under jemalloc took ~180,000 minor faults per second
with ~22 % of its CPU time in the kernel (session 9, ``/proc/PID/stat`` sampled every 30 s).
All three write into ``results/allocator.json`` (one key each; ``trainlog --key`` names another, so the
logs of several runs sit side by side) with the usual provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402

from kpod.allocator import allocator_in, find_fast_allocator  # noqa: E402

OUT = RESULTS / "allocator.json"

TRAIN_SNIPPET = r"""
import hashlib, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from kpod.allocator import current_allocator
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(1)
losses = []
for length in (37, 120, 64, 201, 90, 150):
    ids = torch.randint(0, 2000, (8, length), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
digest = hashlib.sha1()
for p in model.parameters():
    digest.update(p.detach().numpy().tobytes())
print(json.dumps({"allocator": current_allocator(), "weights_sha1": digest.hexdigest(),
                  "losses": losses}))
"""


def _train(preload: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_SNIPPET], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def numerics() -> dict:
    library = find_fast_allocator()
    if library is None:
        raise SystemExit("no jemalloc/tcmalloc/mimalloc installed (Debian: apt-get install libjemalloc2)")
    system, fast = _train(None), _train(library)
    if fast["allocator"] != allocator_in([str(library)]):
        raise SystemExit(f"{library} was preloaded but the process reports {fast['allocator']}")
    return {
        "library": str(library),
        "runs": [system, fast],
        "same_weights": system["weights_sha1"] == fast["weights_sha1"],
        "same_losses": system["losses"] == fast["losses"],
    }


# (name, allocator library or None for the C library's malloc, extra environment, kpod's per-step
# malloc_trim on). jemalloc's default purges freed pages after ~10 s (dirty_decay_ms); "retain"
# never purges, so a step reuses the pages the last one faulted in. glibc's mmap_max=0 serves even
# the largest tensors (the logits: batch x length x 49k vocabulary) from the heap instead of mmap.
SETTINGS: list[tuple[str, str | None, dict[str, str], bool]] = [
    ("glibc (kpod default: trim each step)", None, {}, True),
    ("glibc, no trim", None, {}, False),
    (
        "glibc, no trim, heap only",
        None,
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
        False,
    ),
    ("jemalloc", "jemalloc", {}, True),
    ("jemalloc, retain pages", "jemalloc", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}, True),
]

BATCH, MAX_LENGTH = 8, 512  # the cpu-small suite's shape

SPEED_CHILD = r"""
import argparse, json, resource, sys, time
sys.path.insert(0, {bench!r})
import throughput
import kpod.distill.trainer as trainer
from kpod.allocator import current_allocator
from kpod.models import load_tokenizer
if not {trim!r}:
    trainer.release_freed_memory = lambda: None
args = argparse.Namespace(student={student!r}, batch_size={batch}, max_length={max_length}, precision="bf16")
examples, _ = throughput.load_data({steps} * args.batch_size, load_tokenizer(args.student), args.max_length)
before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
measured = throughput.ours("std-cot", args, examples, __import__("pathlib").Path({out!r}))
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
cpu_user, cpu_sys = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
print(json.dumps({{**measured, "allocator": current_allocator(),
    "minor_faults_per_s": round((after.ru_minflt - before.ru_minflt) / wall),
    "kernel_share": round(cpu_sys / (cpu_user + cpu_sys), 3),
    "max_rss_mib": round(after.ru_maxrss / 1024)}}))
"""


def speed(steps: int, rounds: int, student: str, out: Path) -> dict:
    """Each setting in its own fresh process, ``rounds`` times in rotated order (so that none always
    runs first on a machine whose speed drifts); the figure per setting is the mean over rounds."""
    shutil.rmtree(out, ignore_errors=True)  # kpod resumes from a checkpoint it finds: start clean
    found = find_fast_allocator()
    libraries = {"jemalloc": found if found and allocator_in([str(found)]) == "jemalloc" else None}
    rows: dict[str, list[dict]] = {name: [] for name, *_ in SETTINGS}
    for r in range(rounds):
        order = SETTINGS[r % len(SETTINGS) :] + SETTINGS[: r % len(SETTINGS)]
        for setting in order:
            name, library, extra, trim = setting
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
            env.update(extra)
            if library is not None:
                if libraries[library] is None:
                    print(f"skipped ({library} not installed): {name}", flush=True)
                    continue
                env["LD_PRELOAD"] = str(libraries[library])
            code = SPEED_CHILD.format(
                bench=str(Path(__file__).resolve().parent),
                trim=trim,
                student=student,
                steps=steps,
                batch=BATCH,
                max_length=MAX_LENGTH,
                out=str(out / f"setting{SETTINGS.index(setting)}-round{r}"),
            )
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"setting {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name].append(row)
            print(name, row, flush=True)
    report = []
    for name, _, extra, trim in SETTINGS:
        if not rows[name]:
            continue
        n = len(rows[name])
        mean = {
            k: round(sum(x[k] for x in rows[name]) / n, 3)
            for k in ("tokens_per_s", "minor_faults_per_s", "kernel_share", "max_rss_mib")
        }
        report.append({"setting": name, "env": extra, "malloc_trim": trim, **mean, "rounds": rows[name]})
    return {
        "student": student,
        "steps": steps,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "precision": "bf16",
        "settings": report,
    }


def sittings(rows: list[dict], starts: list[int]) -> list[list[dict]]:
    """Split a run's log rows into sittings, each later one beginning at a step of ``starts``.

    A resumed kpod run rewrites its log from the checkpoint's step, so the log itself does not
    show where a sitting began; the caller knows (the "resuming from" line of the run's output)."""
    out: list[list[dict]] = []
    for row in rows:
        if not out or row["step"] in starts:
            out.append([])
        out[-1].append(row)
    return out


def _rate(rows: list[dict]) -> float:
    seconds = sum(r["step_s"] for r in rows)
    return round(sum(r["tokens"] for r in rows) / seconds, 1) if seconds else 0.0


def trainlog(path: Path, starts: list[int], labels: list[str], window: int) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parts = sittings(rows, starts)
    if labels and len(labels) != len(parts):
        raise SystemExit(f"{path}: {len(parts)} sittings in the log, {len(labels)} labels given")
    report = []
    for i, part in enumerate(parts):
        windows = [part[j : j + window] for j in range(0, len(part), window)]
        report.append(
            {
                "sitting": i,
                "allocator": labels[i] if labels else None,
                "steps": [part[0]["step"], part[-1]["step"]],
                "tokens_per_s": _rate(part),
                "windows": [
                    {"steps": [w[0]["step"], w[-1]["step"]], "tokens_per_s": _rate(w)} for w in windows
                ],
            }
        )
    return {"log": str(path), "window": window, "starts": starts, "sittings": report}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("numerics", help="the same small training under the system malloc and a preloaded one")
    fast = sub.add_parser("speed", help="tokens/s, page faults and kernel time per allocator setting")
    fast.add_argument("--steps", type=int, default=16, help="optimiser steps per setting (first is warm-up)")
    fast.add_argument("--rounds", type=int, default=1, help="runs per setting, in rotated order")
    fast.add_argument("--student", default="smollm2-135m-instruct")
    fast.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-allocator")
    log = sub.add_parser(
        "trainlog", help="tokens/s per sitting and window of a resumed run's train_log.jsonl"
    )
    log.add_argument("path", type=Path)
    log.add_argument("--starts", default="", help="comma-separated first step of each later sitting")
    log.add_argument("--labels", default="", help="comma-separated allocator of each sitting")
    log.add_argument("--window", type=int, default=25, help="steps per window (default 25)")
    log.add_argument(
        "--key",
        default="trainlog",
        help="key of results/allocator.json to write (default trainlog); another key keeps earlier logs",
    )
    args = parser.parse_args()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    key = args.key if args.what == "trainlog" else args.what
    if args.what == "numerics":
        result[key] = {**provenance(), **numerics()}
    elif args.what == "speed":
        result[key] = {**provenance(), **speed(args.steps, args.rounds, args.student, args.out)}
    else:
        labels = [x for x in args.labels.split(",") if x]
        starts = [int(x) for x in args.starts.split(",") if x]
        result[key] = {**provenance(), **trainlog(args.path, starts, labels, args.window)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result[key], indent=1))


if __name__ == "__main__":
    main()
