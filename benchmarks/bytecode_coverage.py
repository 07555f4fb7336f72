"""Which installed modules a run read, and whether another venv has their bytecode.

    .venv/bin/python benchmarks/bytecode_coverage.py RUN_VENV [OTHER_VENV]

RUN_VENV: a venv whose bytecode was written at set-up and which then served one run (a fresh
clone's `make demo`); on a filesystem mounted `relatime` (Linux's default) a .pyc read after it was
written has an access time later than its modification time, so those are the files the run read.
OTHER_VENV: a venv set up another way (`make setup` of another commit); prints how many of the read
files it holds, and the packages of those it lacks. Counts by top-level package on stdout.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path


def pyc_files(venv: Path) -> dict[str, os.stat_result]:
    site = next(venv.glob("lib/python*/site-packages"))
    return {str(path.relative_to(site)): path.stat() for path in site.rglob("*.pyc")}


def main(argv: list[str]) -> None:
    run = pyc_files(Path(argv[0]))
    read = {name for name, stat in run.items() if stat.st_atime > stat.st_mtime + 1}
    by_package = collections.Counter(name.split("/")[0] for name in read)
    print(f"{len(read)} of {len(run)} .pyc files read by the run")
    print("read, by package:", ", ".join(f"{k} {v}" for k, v in by_package.most_common(12)))
    if len(argv) > 1:
        other = set(pyc_files(Path(argv[1])))
        missing = read - other
        print(f"{len(other)} .pyc files in {argv[1]}; {len(read) - len(missing)} of the {len(read)} read")
        lacking = collections.Counter(name.split("/")[0] for name in missing)
        print("lacking, by package:", ", ".join(f"{k} {v}" for k, v in lacking.most_common()))


if __name__ == "__main__":
    main(sys.argv[1:])
