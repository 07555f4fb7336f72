"""``kpod run`` with glibc's heap trimmed after every CPU training step (kpod's rule before session
35), for comparing a long run against today's trim on growth (:class:`kpod.allocator.HeapTrimmer`):

    .venv/bin/python benchmarks/kpod_run_trim_always.py CONFIG [KEY=VALUE ...]

Arguments as ``kpod run``'s; each step's ``rss_mib`` and ``tokens_per_s`` land in the run's
``train_log.jsonl`` as usual (``heap_trim`` true at every step).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fixed_heap_trimmer  # noqa: E402

if __name__ == "__main__":
    import kpod.distill.trainer as trainer
    from kpod.cli import main

    trainer.HeapTrimmer = fixed_heap_trimmer(always=True)
    sys.exit(main(["run", *sys.argv[1:]]))
