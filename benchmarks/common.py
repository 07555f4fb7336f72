"""Facts every benchmark result records: machine, date, commit, command; and a run's wall time
summed over the sittings it took."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# This tree's kpod before an installed one: a clone measured with another tree's `.venv` (whose
# editable install points at that tree's src) measured the other tree's code until session 35.
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from kpod.allocator import current_allocator  # noqa: E402


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    python = platform.python_version()
    text = f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {python}"
    # Since session 18: name a thread count below the cores (OMP_NUM_THREADS=1 to run two suite runs
    # side by side): it changes speed and the order of bf16 sums, so a run's figures by a few questions.
    threads = torch.get_num_threads()
    if threads < (os.cpu_count() or threads):
        text += f", {threads} torch thread{'s' if threads > 1 else ''}"
    # Since session 8: name a preloaded allocator (it changes CPU speed, not results; kpod.allocator).
    allocator = current_allocator()
    return text if allocator == "system" else f"{text}, {allocator}"


def cpu_times() -> tuple[int, int]:
    """(steal, all) jiffies of the machine so far (/proc/stat): on a shared VM the hypervisor's
    steal is time the guest's threads wanted and did not get. Two readings around a timing give
    its steal share."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields)


def provenance() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


class SittingClock:
    """Wall time of a run that may be killed and resumed in a later sitting.

    A run's own timer restarts with each process, so a run cut by the end of a session and resumed
    would report only its last sitting. This clock keeps every sitting's elapsed time in ``path``
    (JSON), rewritten every ``every`` seconds from a daemon thread and on exit, so a killed sitting
    loses at most ``every`` seconds of its count. ``total_seconds`` sums the sittings; delete the
    file (``reset``) once the run's result is written, so a re-run starts from zero.
    """

    def __init__(self, path: Path, every: float = 30.0) -> None:
        self.path = Path(path)
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self.sittings: list[dict] = []

    def __enter__(self) -> SittingClock:
        if self.path.exists():
            self.sittings = json.loads(self.path.read_text())["sittings"]
        self.sittings.append({"started": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": 0.0})
        self._start = time.perf_counter()
        self._write()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def _write(self) -> None:
        self.sittings[-1]["seconds"] = round(time.perf_counter() - self._start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sittings": self.sittings}, indent=1) + "\n")
        tmp.replace(self.path)

    @property
    def total_seconds(self) -> float:
        """Every sitting's time, this one up to now (or up to its exit)."""
        if not self._stop.is_set():
            self.sittings[-1]["seconds"] = round(time.perf_counter() - self._start, 1)
        return round(sum(s["seconds"] for s in self.sittings), 1)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def random_training_batch(rows: int, length: int) -> dict:
    """A causal training batch of random tokens as the step benchmarks time it: ``rows`` x
    ``length`` tokens, the first 45 % of each row unlabelled (as a question is), random token
    weights, no padding."""
    import torch

    ids = torch.randint(100, 40000, (rows, length))
    labels = ids.clone()
    labels[:, : int(length * 0.45)] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "labels": labels,
        "weights": torch.rand(rows, length),
    }


def bare_step(model, batch: dict, bf16: bool, optimizer=None) -> tuple[float, float]:
    """(tokens/s, loss) of one training step of ``model`` on ``batch`` as the step benchmarks time
    it: the loss from hidden states under bf16 autocast (or fp32), its backward, the optimiser's
    step where one is given (without, the weights stay as they are), the gradients dropped."""
    import torch

    from kpod.distill.loss import sequence_nll

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = sequence_nll(model, batch, "causal", 0, 0, from_hidden=True)
    (loss / 1000).backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return round(batch["input_ids"].numel() / (time.perf_counter() - start), 1), loss.item()


def add_bare_step_options(parser) -> None:
    """The options of the benchmarks that alternate settings of the bare step in one process."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each setting per round")


def bare_step_student():
    """The offline student as the bare-step benchmarks train it, and its trainable parameters by
    name: LoRA's B drawn at random (a new adapter's B is zero; a trained one is not)."""
    from kpod.models import StudentConfig

    model = StudentConfig().load().model
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model, trainable


def alternating_rounds(settings: dict, step, rounds: int, steps: int) -> dict[str, list[float]]:
    """Tokens/s of ``steps`` calls of ``step()`` under each of ``settings`` (name: a context manager
    factory) per round, the order reversed every other round so that both see the same machine;
    prints each round."""
    timed: dict[str, list[float]] = {name: [] for name in settings}
    for k in range(rounds):
        for name in list(settings) if k % 2 == 0 else list(settings)[::-1]:
            with settings[name]():
                timed[name] += [step() for _ in range(steps)]
        print({name: speeds[-steps:] for name, speeds in timed.items()}, flush=True)
    return timed


def fixed_heap_trimmer(always: bool) -> type:
    """A :class:`kpod.allocator.HeapTrimmer` with a fixed rule in place of the trainer's: the heap
    trimmed after every step (kpod's rule before session 35), or never. It reads the resident
    memory at each step's end as the trainer's own rule does (logged as ``rss_mib``)."""
    from kpod.allocator import HeapTrimmer

    class FixedTrim(HeapTrimmer):
        def after_step(self) -> bool:
            self.size = self.resident()
            if always:
                self.trim()
                self.trims += 1
            return always

    return FixedTrim
