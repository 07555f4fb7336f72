"""An append-only JSONL store of teacher rationales that survives ``kill -9``.

Each record is one JSON object on one line, keyed by (question id, teacher model, prompt hash,
sample index). Appends are single ``os.write`` calls of a whole line on a file opened with
``O_APPEND``, followed by ``fsync``: a process killed at any moment leaves complete lines behind
(a write is never torn by SIGKILL on a local file system). Should a line still be cut short (power
loss, a full disk), opening the store drops the incomplete tail, so the file is valid JSONL again
and a re-run regenerates exactly the records that are missing. A key already present is never
written twice.

A store has one writer at a time: opening it takes its :class:`kpod.lock.WriterLock` (``STORE.lock``),
so a second process on the same file is refused (or waits, with ``wait=True``) instead of paying the
teacher for every request a second time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kpod.errors import DataError
from kpod.lock import WriterLock

log = logging.getLogger(__name__)

KEY_FIELDS = ("qid", "teacher", "prompt_hash", "sample")


def record_key(record: dict[str, Any]) -> tuple[str, str, str, int]:
    """The store key of a record: (qid, teacher, prompt hash, sample index)."""
    return (str(record["qid"]), str(record["teacher"]), str(record["prompt_hash"]), int(record["sample"]))


class RationaleStore:
    """Append-only, crash-safe JSONL store of teacher completions.

    Use as a context manager or call :meth:`close`. ``fsync=False`` trades crash safety against
    power loss for speed (a killed process still leaves complete lines). The store's writer lock is
    held from here to :meth:`close`; ``wait`` as in :class:`kpod.lock.WriterLock`.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, wait: bool | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd = -1
        self._lock = WriterLock(self.path, directory=False, wait=wait).acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._records: dict[tuple[str, str, str, int], dict[str, Any]] = {}
            self.repaired_bytes = 0
            self._load_and_repair()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._lock.release()
            raise

    def _load_and_repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is an incomplete record
        if keep < len(data):
            self.repaired_bytes = len(data) - keep
            log.warning("%s: dropping an incomplete last record (%d bytes)", self.path, self.repaired_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        for lineno, line in enumerate(data[:keep].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(
                    f"not a rationale-store record ({err}); was this file written by kpod?",
                    source=str(self.path),
                    line=lineno,
                ) from None
            self._records.setdefault(key, record)

    def __contains__(self, key: tuple[str, str, str, int]) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records.values())

    def append(self, record: dict[str, Any]) -> bool:
        """Write ``record`` unless its key is already stored; return whether it was written."""
        key = record_key(record)
        if key in self._records:
            return False
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # pragma: no cover - only on a full disk
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        if self.fsync:
            os.fsync(self._fd)
        self._records[key] = record
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._lock.release()

    def __enter__(self) -> RationaleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
