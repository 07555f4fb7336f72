"""A run's independent steps side by side: ``jobs: 2`` (what ``auto`` chooses on a CPU).

On a 2-core CPU two one-thread processes train faster together than one two-thread process does:
1.38x for std-cot and 1.53x for kpod on session 28's Intel Xeon, 1.17-1.23x on session 18's AMD
EPYC (BENCHMARKS.md, "Issue #21, session 28"): a training step's many small operators leave the
second thread idle for much of it. So ``kpod run`` splits the steps after ``data`` (and ``teacher``)
in two streams:

* the *side* stream, run one after another by a second process (``python -m kpod.streams``): the
  steps that read nothing but the data and that no other step reads, i.e. ``eval-untrained`` and
  the trainings of methods without token weights or a schedule (std-cot, answer-only,
  step-by-step, ...);
* the *main* stream, in the ``kpod run`` process: everything else (weights, schedules, kpod and its
  ablations).

While both run, each has half the threads (``torch.get_num_threads() // 2``), for all of its steps,
even after the other process has ended. Until session 29 the one left took every thread at its next
training or weighting step; but the thread count changes the order of bf16 sums, and the moment the
other process ends is a matter of timing, so two runs of one config gave different numbers (the
quickstart's kpod: 41.67 % and 40.62 %, its losses equal up to step 93 of 96; BENCHMARKS.md, "Issue
#21, session 29"). A run's numbers now depend on its config and machine only, at the cost of the
last stretch of the longer stream running on half the threads (about 25 s of the quickstart's, an
estimate: the machine's drift hid it).

The choice (ours; the paper trains on GPUs and is silent): ``auto`` is 2 on a CPU with at least two
threads, 1 on a GPU (two processes would share one device), with one thread (an accuracy suite
running two one-thread streams of its own, ``benchmarks/accuracy.py --streams 2``) and under a
distributed launch (each rank would start its own). Two processes
hold two models: set ``jobs: 1`` where memory is short.

What stays as it was: the steps, their keys and folders, resuming. The side process works under
the run directory's writer lock, which the main process holds for it (it checks that the lock
names its parent and refuses otherwise), and never writes ``manifest.json``: the main process
records the side's steps from their ``stage.json`` markers. The side's output goes to
``side.log`` in the run directory; its lines that start a step or finish one are echoed as they
come. If the main stream fails, the side process is stopped (its steps resume with the next run,
as after any interruption), and it ends by itself at the main process's end, even one killed with
SIGKILL (:func:`_end_with_parent`); if the side process fails, the main stream finishes and the run then
stops with the side's error. A step's numbers differ from a two-thread run's by rounding (the
thread count changes the order of bf16 sums), as a seed changes a few answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from kpod.errors import KpodError

Jobs = int | Literal["auto"]
SIDE_LOG = "side.log"
JOB_FILE = ".side-job.json"

# The thread count this process had before its side-by-side part (None: nothing shared).
_sharing: dict[str, Any] = {"threads": None}


def share_threads(threads: int) -> None:
    """Run with ``threads`` threads (half the machine) until :func:`stop_sharing`."""
    import torch

    if _sharing["threads"] is None:
        _sharing["threads"] = torch.get_num_threads()
    torch.set_num_threads(threads)


def stop_sharing() -> None:
    """Take all the threads back (this process's side-by-side part is over)."""
    import torch

    if _sharing["threads"] is not None:
        torch.set_num_threads(_sharing["threads"])
    _sharing["threads"] = None


def resolve_jobs(setting: Jobs) -> int:
    """How many processes ``setting`` (1, 2 or ``auto``, as ``PipelineConfig`` validates it at load)
    runs a run's steps in: 1 or 2 (``auto``: module docstring). Under ``accelerate launch`` or
    ``torchrun`` (``WORLD_SIZE`` > 1) every rank would start a side process of its own: ``auto`` is 1
    there and 2 is refused."""
    import torch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if setting == "auto":
        return 2 if not distributed and not torch.cuda.is_available() and torch.get_num_threads() >= 2 else 1
    if setting == 2 and distributed:
        raise KpodError(
            "jobs: 2 runs some steps in a second process, which does not mix with a distributed launch "
            "(WORLD_SIZE > 1): set jobs=1"
        )
    return int(setting)


def side_step_names(steps: Sequence[Any], before: Sequence[str] = ("data", "teacher")) -> list[str]:
    """The steps the side process can run: those whose upstream steps are all in ``before`` (done
    before the split) and that no other step reads from. ``steps`` are :class:`PlannedStep`-like
    (``name``, ``upstream``), in run order."""
    read = {u for s in steps for u in s.upstream}
    return [s.name for s in steps if set(s.upstream) <= set(before) and s.name not in read]


class SideProcess:
    """The second process of a run, running ``names`` (steps of ``config``) one after another with
    ``threads`` threads, its output in ``run_dir/side.log``; lines that start or finish a step are
    passed to ``echo`` as they come. ``keys`` are the main process's step keys (:meth:`Runner.key`),
    so that the side process neither computes them again nor reads the data's files to do so."""

    def __init__(
        self,
        config_data: dict[str, Any],
        keys: dict[str, str],
        run_dir: Path,
        names: Sequence[str],
        threads: int,
        echo: Callable[[str], None],
    ) -> None:
        self.names = list(names)
        self.log_path = run_dir / SIDE_LOG
        self.job = run_dir / JOB_FILE
        self.job.write_text(json.dumps(self._job(config_data, keys)))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kpod.streams", str(self.job)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by the copying thread)
        self._copier = threading.Thread(target=self._copy, args=(self.process.stdout, echo), daemon=True)
        self._copier.start()

    def _job(self, config_data: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
        """What the side process is told: the config, the step keys, its steps and its parent (this
        process)."""
        return {
            "config": config_data,
            "keys": keys,
            "steps": self.names,
            "parent": os.getpid(),
        }

    def _copy(self, stream: IO[bytes], echo: Callable[[str], None]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._log.write(raw)
                self._log.flush()
                for part in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                    if part.startswith("[") and part.rstrip().endswith(("running", "resuming", " s")):
                        echo(f"{part.rstrip()} (side process)")
        finally:
            self._log.close()

    def done(self) -> bool:
        return self.process.poll() is not None

    def wait(self) -> int:
        """Wait for the side process to end; its exit code."""
        code = self.process.wait()
        self._copier.join()
        self.job.unlink(missing_ok=True)
        return code

    def stop(self) -> None:
        """End the side process now (the main stream failed or was interrupted)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.wait()

    def failure(self, code: int) -> KpodError:
        """The error a failed side process ends the run with: its steps, exit code and last lines."""
        lines = self.log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = "\n  ".join([line for line in lines if line.strip()][-8:])
        return KpodError(
            f"the side process running {', '.join(self.names)} failed (exit code {code}); the other steps "
            f"finished; its log is {self.log_path}, which ends:\n  {tail}\nrun again to resume"
        )


def _end_with_parent(parent: int) -> None:
    """End this process (SIGTERM) when its parent ends. Killed with SIGKILL, the parent cannot stop
    it, and its lock on the run directory is gone with it, so the side process would go on writing a
    run that the next `kpod run` resumes; one that writes nothing for a while (a long generation) would
    not learn of it from a broken pipe either. On Linux the kernel sends the signal at the parent's end
    (``prctl(PR_SET_PDEATHSIG)``; the parent starts this process from the thread that waits for it, so
    that thread's end is the run's); elsewhere, and for a parent gone before the call, a watching thread
    that looks five times a second."""
    import signal
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watching thread below still ends it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="kpod-side-watch").start()


def main(argv: Sequence[str]) -> int:
    """The side process: run the job file's steps of its config, under its parent's lock."""
    from kpod.config import from_dict
    from kpod.lock import _holder, lock_path
    from kpod.pipeline import PipelineConfig, Runner, plan_steps

    try:
        job = json.loads(Path(argv[0]).read_text())
        config = from_dict(PipelineConfig, job["config"])
        holder = _holder(lock_path(config.directory, directory=True))
        if holder != job["parent"] or job["parent"] != os.getppid():
            raise KpodError(
                f"{config.directory}: the side process of a `kpod run` runs only under its parent's lock "
                f"(the lock names process {holder}, the job's parent is {job['parent']})"
            )
        _end_with_parent(job["parent"])
        runner = Runner(config, {}, echo=lambda line: print(line, flush=True), manifest=False)
        runner.keys.update(job["keys"])  # its steps' upstream keys, as the main process made them
        for step in plan_steps(config, runner.dir):
            if step.name in job["steps"]:
                runner.step(step.name, step.settings, step.upstream, step.fn)
    except KpodError as err:
        print(f"kpod: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
