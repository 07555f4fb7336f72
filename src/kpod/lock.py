"""One writer at a time: an exclusive operating-system lock per written resource.

Every kpod writer (the teacher store, a `kpod run` run directory, the output folders of `kpod
distill`, `kpod weights train` and `kpod schedule plan`, the predictions file of `kpod eval --out`)
holds a :class:`WriterLock` for as long as it writes. A second process asking for the same resource
stops at once with :class:`LockedError` (exit code 2, one line naming the resource and the process
that holds it) before it writes anything, unless it was asked to wait (``wait=True``, the CLI's
``--wait``, or :func:`set_wait` for a whole program).

Why ``flock`` and not a lock file that exists or not: the kernel drops the lock when the holding
process dies, ``kill -9`` included, so there is never a stale lock to delete by hand. The lock file
(``DIR/.kpod.lock`` for a directory, ``FILE.lock`` beside a file) holds the holder's PID so that the
refusal can name it; it is removed on release. A process that acquires the lock checks that the
file it locked is still the one at that path (a releasing holder may have unlinked it in between)
and tries again if not, so two processes never both believe they hold it.

Within one process the lock is re-entrant: `kpod run` holds its run directory while its stages take
the locks of their own folders, and a stage called twice on one resource in one process does not
deadlock against itself. Locks are advisory: they exclude kpod writers, not other programs.
Under ``accelerate launch`` only the main process takes a run's lock (:func:`is_main_process`).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kpod.errors import KpodError

T = TypeVar("T")
_default_wait = False
_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, re-entry count), this process
_guard = threading.Lock()


class LockedError(KpodError):
    """Another process is writing the resource this one asked for."""

    def __init__(self, resource: Path, lock_file: Path, pid: int | None) -> None:
        self.resource = resource
        self.lock_file = lock_file
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{resource} is being written by {holder} (lock {lock_file}); wait for it to finish, "
            "or pass --wait to queue behind it"
        )


def set_wait(wait: bool) -> None:
    """Make every lock this process asks for wait for its holder instead of refusing (CLI ``--wait``)."""
    global _default_wait
    _default_wait = bool(wait)


def is_main_process() -> bool:
    """Whether this process is the one that takes a run's lock: rank 0 under torchrun/accelerate."""
    return int(os.environ.get("RANK", "0")) == 0


def lock_path(resource: str | os.PathLike[str], directory: bool) -> Path:
    """The lock file of ``resource``: ``DIR/.kpod.lock`` for a directory, ``FILE.lock`` beside a file."""
    path = Path(resource).absolute()
    return path / ".kpod.lock" if directory else path.with_name(path.name + ".lock")


def _holder(lock_file: Path) -> int | None:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class WriterLock:
    """An exclusive, re-entrant, kill-safe lock on one resource; a context manager.

    ``directory`` says whether the resource is a folder (its lock file goes inside) or a file (beside
    it). ``wait=None`` takes the program's default (:func:`set_wait`); ``timeout`` bounds a wait
    (seconds).
    """

    def __init__(
        self,
        resource: str | os.PathLike[str],
        *,
        directory: bool,
        wait: bool | None = None,
        timeout: float | None = None,
    ) -> None:
        self.resource = Path(resource)
        self.path = lock_path(resource, directory)
        self.wait = _default_wait if wait is None else wait
        self.timeout = timeout
        self._acquired = False

    def acquire(self) -> WriterLock:
        if self._acquired:
            return self
        with _guard:
            if self.path in _held:
                fd, count = _held[self.path]
                _held[self.path] = (fd, count + 1)
                self._acquired = True
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise LockedError(self.resource, self.path, _holder(self.path)) from None
                time.sleep(0.2)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            with _guard:
                _held[self.path] = (fd, 1)
            self._acquired = True
            return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with _guard:
            fd, count = _held[self.path]
            if count > 1:
                _held[self.path] = (fd, count - 1)
                return
            del _held[self.path]
        try:
            self.path.unlink()  # while still locked: a waiter re-checks the inode and retries
        except FileNotFoundError:
            pass
        os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer_lock(
    resource: str | os.PathLike[str] | None, *, directory: bool, wait: bool | None = None
) -> WriterLock | _NoLock:
    """The lock of ``resource`` for this process: a real one on the main process, a no-op on other
    ranks of a distributed run (the main rank holds it for them) or when ``resource`` is None."""
    if resource is None or not is_main_process():
        return _NoLock()
    return WriterLock(resource, directory=directory, wait=wait)


class _NoLock:
    def acquire(self) -> _NoLock:
        return self

    def release(self) -> None:
        pass

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def holds_lock(resource: str | Callable[[dict[str, Any]], Any], *, directory: bool):
    """Decorate a writer so that it holds its output's lock while it runs (:func:`writer_lock`).

    ``resource`` names the argument that is the written path, or maps the bound arguments to it;
    a ``None`` path takes no lock. The function keeps its signature and docstring."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> T:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            path = resource(bound.arguments) if callable(resource) else bound.arguments[resource]
            with writer_lock(path, directory=directory):
                return fn(*args, **kwargs)

        return locked

    return decorate
