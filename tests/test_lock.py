"""One writer at a time (kpod.lock): a second process is refused with the holder's PID, a killed
holder leaves no lock behind, --wait queues, and the CLI writes nothing when refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpod.errors import KpodError
from kpod.io import write_jsonl
from kpod.lock import LockedError, WriterLock, holds_lock, lock_path

HOLDER = """
import sys, time
from kpod.lock import WriterLock
lock = WriterLock(sys.argv[1], directory=sys.argv[2] == "dir").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold_in_other_process(resource: Path, directory: bool, seconds: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(resource), "dir" if directory else "file", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = hold_in_other_process(out, directory=True)
    try:
        with pytest.raises(LockedError) as err:
            WriterLock(out, directory=True).acquire()
        assert err.value.pid == holder.pid
        assert isinstance(err.value, KpodError) and err.value.exit_code == 2
        message = str(err.value)
        assert str(out) in message and f"process {holder.pid}" in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_leaves_no_lock_that_blocks(tmp_path: Path) -> None:
    store = tmp_path / "store.jsonl"
    holder = hold_in_other_process(store, directory=False)
    assert lock_path(store, directory=False).exists()  # the lock file stays behind a kill ...
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(store, directory=False).read_text().strip() == str(holder.pid)
    with WriterLock(store, directory=False):  # ... but the kernel released the lock itself
        assert lock_path(store, directory=False).read_text().strip() == str(os.getpid())
    assert not lock_path(store, directory=False).exists()  # a clean release removes the file


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = hold_in_other_process(out, directory=True, seconds=1.5)
    start = time.monotonic()
    with WriterLock(out, directory=True, wait=True):
        waited = time.monotonic() - start
        assert holder.poll() is not None  # the holder had finished before we got it
    holder.wait()
    assert waited > 0.5
    holder = hold_in_other_process(out, directory=True)
    try:
        with pytest.raises(LockedError):  # a bounded wait gives up
            WriterLock(out, directory=True, wait=True, timeout=0.5).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_reentrant_within_a_process_and_exclusive_between(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with WriterLock(out, directory=True):
        with WriterLock(out, directory=True):  # a stage inside `kpod run` takes it again
            pass
        assert lock_path(out, directory=True).exists()  # still held by the outer one
        probe = subprocess.run(
            [sys.executable, "-c", HOLDER, str(out), "dir", "0"], capture_output=True, text=True
        )
        assert probe.returncode != 0 and "LockedError" in probe.stderr
    assert not lock_path(out, directory=True).exists()


def test_holds_lock_refuses_before_the_function_runs(tmp_path: Path) -> None:
    calls = []

    @holds_lock("out", directory=False)
    def write(rows, out=None):
        """Doc."""
        calls.append(out)
        if out is not None:
            write_jsonl(out, rows)

    target = tmp_path / "preds.jsonl"
    holder = hold_in_other_process(target, directory=False)
    try:
        with pytest.raises(LockedError):
            write([{"a": 1}], out=target)
        assert calls == [] and not target.exists()
        write([{"a": 1}])  # no path: no lock
        assert calls == [None]
    finally:
        holder.kill()
        holder.wait()
    write([{"a": 1}], out=target)
    assert json.loads(target.read_text()) == {"a": 1} and write.__doc__ == "Doc."


def test_kpod_eval_refused_writes_nothing_and_wait_proceeds(tiny_causal: Path, tmp_path: Path) -> None:
    from kpod.data.synthetic import arithmetic_examples

    data = tmp_path / "q.jsonl"
    write_jsonl(data, [e.to_dict() for e in arithmetic_examples(3, seed=1)])
    preds = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "kpod.cli", "eval", str(tiny_causal), str(data), "--out", str(preds)]
    cmd += ["--max-new-tokens", "4"]
    holder = hold_in_other_process(preds, directory=False)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"process {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not preds.exists() and not Path(str(preds) + ".partial").exists()
    holder = hold_in_other_process(preds, directory=False, seconds=2)
    proc = subprocess.run([*cmd, "--wait"], capture_output=True, text=True, timeout=120)
    holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert len(preds.read_text().splitlines()) == 3
