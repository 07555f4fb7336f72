"""Training checkpoints that are never half-written.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN`` holding accelerate's saved state (model
or adapter, optimiser, learning-rate scheduler, every RNG) and ``trainer_state.json`` (step, epoch,
data position, best dev result). It is written under a temporary name and renamed into place only
when complete, so a crash at any moment leaves either the previous checkpoints or the new one, and
:func:`latest_checkpoint` never returns a partial directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))


def save_checkpoint(accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save accelerate's state plus ``state`` as checkpoint ``step``; keep the newest ``keep``.

    Every process must call this (sharded states are saved collectively); only the main process
    renames and prunes.
    """
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # the same step saved again (a stage end that is also a save_every step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(
            (p for p in root.iterdir() if p.name.startswith(PREFIX)), key=lambda p: int(p.name[len(PREFIX) :])
        )
        for old in complete[: max(0, len(complete) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
