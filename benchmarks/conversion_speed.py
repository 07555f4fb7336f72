"""Seconds to convert the offline student's GGUF file into a safetensors checkpoint, with gguf's
reader on its ``np.memmap`` (before commit 4578d4d) and on a plain ndarray view of it (after),
alternated, each conversion in a new process with the imports done before the clock starts.

    .venv/bin/python benchmarks/conversion_speed.py [--rounds 2]

Each process converts into a new temporary folder; the files of the two readers are compared
byte for byte. Prints one line per conversion and a JSON summary
(``results/conversion-speed.json``).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def convert(reader: str, target: Path) -> float:
    """One conversion in this process; ``reader``: ``memmap`` (before) or ``plain`` (after)."""
    import gguf  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: F401

    from kpod import models

    if reader == "memmap":
        models._plain_array_reader = lambda cls: cls
    start = time.perf_counter()
    models._convert_offline(models.DEFAULT_STUDENT, target)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: READER TARGET
    args = parser.parse_args()
    if args.one:
        print(f"{convert(args.one[0], Path(args.one[1])):.2f}")
        return
    seconds: dict[str, list[float]] = {"memmap": [], "plain": []}
    folders = {}
    for round_ in range(args.rounds):
        for reader in seconds:
            target = Path(tempfile.mkdtemp()) / "student"
            out = subprocess.run(
                [sys.executable, __file__, "--one", reader, str(target)],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds[reader].append(float(out.stdout.split()[-1]))
            folders[reader] = target
            print(f"round {round_ + 1} {reader}: {seconds[reader][-1]:.2f} s", flush=True)
    names = sorted(p.name for p in folders["plain"].iterdir())
    same = all(filecmp.cmp(folders["plain"] / n, folders["memmap"] / n, shallow=False) for n in names)
    summary = {**provenance(), "seconds": seconds, "files": names, "files_identical": same}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "conversion-speed.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("seconds", "files_identical")}))


if __name__ == "__main__":
    main()
