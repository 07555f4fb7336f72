"""``kpod run`` with glibc's heap trimmed after every CPU training step (kpod's rule before session
35), for comparing a long run against today's trim on growth (:class:`kpod.allocator.HeapTrimmer`):

    .venv/bin/python benchmarks/kpod_run_trim_always.py CONFIG [KEY=VALUE ...]

Arguments as ``kpod run``'s; each step's ``rss_mib`` and ``tokens_per_s`` land in the run's
``train_log.jsonl`` as usual (``heap_trim`` true at every step).
"""

from __future__ import annotations

import sys

import kpod.distill.trainer as trainer
from kpod.allocator import HeapTrimmer


class TrimAlways(HeapTrimmer):
    """The heap trimmed at the end of every step."""

    def after_step(self) -> bool:
        self.size = self.resident()
        self.trim()
        self.trims += 1
        return True


if __name__ == "__main__":
    trainer.HeapTrimmer = TrimAlways
    from kpod.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
