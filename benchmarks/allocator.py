"""Does the memory allocator change CPU training speed, or results? Two checks, one result file.

    .venv/bin/python benchmarks/allocator.py numerics          # glibc vs jemalloc: same weights?
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
Both write into ``results/allocator.json`` (one key each) with the usual provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402

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
    log = sub.add_parser(
        "trainlog", help="tokens/s per sitting and window of a resumed run's train_log.jsonl"
    )
    log.add_argument("path", type=Path)
    log.add_argument("--starts", default="", help="comma-separated first step of each later sitting")
    log.add_argument("--labels", default="", help="comma-separated allocator of each sitting")
    log.add_argument("--window", type=int, default=25, help="steps per window (default 25)")
    args = parser.parse_args()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.what == "numerics":
        result["numerics"] = {**provenance(), **numerics()}
    else:
        labels = [x for x in args.labels.split(",") if x]
        starts = [int(x) for x in args.starts.split(",") if x]
        result["trainlog"] = {**provenance(), **trainlog(args.path, starts, labels, args.window)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result[args.what], indent=1))


if __name__ == "__main__":
    main()
