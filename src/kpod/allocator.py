"""Which memory allocator the process runs on, and where a faster one is, for CPU training.

Training on the CPU with length-grouped batches gives every step tensors of new shapes. Under
glibc's malloc the freed blocks fragment its heap and ``_int_malloc`` searches ever longer free
lists, so a long training process slows down, and a restart from its checkpoint is fast again
until it slows again. jemalloc does not use glibc's heap; preloading it changes no result
(bit-identical weights, ``benchmarks/allocator.py numerics``). BENCHMARKS.md ("Memory allocator")
has the measurements. A
process cannot swap its allocator once started, so the ``kpod`` commands that run a model restart
themselves once with jemalloc preloaded where it is installed and nothing else is preloaded
(:func:`restart_on_fast_allocator`; ``KPOD_FAST_MALLOC=0`` keeps the C library's malloc), and the
trainer says how to preload it where it still runs without (:func:`cpu_allocator_hint`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Shared-library name fragments of the allocators worth preloading, in order of preference.
FAST_ALLOCATORS = {"jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc", "mimalloc": "libmimalloc"}

# The environment variable that keeps the C library's malloc for the kpod commands (0, false, no, off).
OPT_OUT_VARIABLE = "KPOD_FAST_MALLOC"

# Where Debian/Ubuntu, Fedora and conda put them (the package libjemalloc2 on Debian).
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)

LIBRARY_FILES = (
    "libjemalloc.so.2",
    "libjemalloc.so",
    "libtcmalloc_minimal.so.4",
    "libtcmalloc.so.4",
    "libmimalloc.so.2",
    "libmimalloc.so",
)


@functools.cache
def glibc() -> Any:
    """The C library when it is glibc (it has ``malloc_trim``), else ``None`` (macOS, musl)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


# mallctl's name for "every arena" (jemalloc's MALLCTL_ARENAS_ALL).
JEMALLOC_ALL_ARENAS = 4096


@functools.cache
def jemalloc_control() -> Any:
    """jemalloc's ``mallctl`` when jemalloc is this process's allocator (preloaded), else ``None``.

    Looked up among the process's global symbols, and only when ``/proc/self/maps`` shows jemalloc
    loaded, so that no other library's function of that name is taken for it."""
    if current_allocator() != "jemalloc":
        return None
    try:
        import ctypes

        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def jemalloc_purge(mallctl: Any) -> bool:
    """Hand every jemalloc arena's freed (dirty and muzzy) pages back to the OS now
    (``arena.<all>.purge``); returns whether jemalloc took the call."""
    return mallctl(f"arena.{JEMALLOC_ALL_ARENAS}.purge".encode(), None, None, None, 0) == 0


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS: jemalloc's purge of its arenas where jemalloc is the
    allocator, else glibc's malloc_trim.

    On CPU, length-grouped batches give every step tensors of new shapes; glibc keeps the freed
    blocks in per-thread arenas and the process grows far beyond its working set (BENCHMARKS.md,
    memory allocator). A trim brings it back near its working set; it does not defragment the
    heap (module docstring). Under jemalloc, malloc_trim would act on glibc's unused heap; the
    purge is its counterpart. When to call it: :class:`HeapTrimmer`. No-op elsewhere.
    """
    mallctl = jemalloc_control()
    if mallctl is not None:
        jemalloc_purge(mallctl)
        return
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (``/proc/self/statm``), or ``None`` where there is
    no such file (macOS)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """When a CPU training loop hands freed heap memory back to the OS (:func:`release_freed_memory`).

    Trimming after every step (kpod until session 35) held the process near its working set, but
    each step then faulted the pages it had just given back in again, zero-filled: the real loop
    was slower with it than without in seven of eight pairs of rows, by 9 % on average (near those
    rows' noise), for 2-6 % less peak memory over a short run, where the resident memory without
    trims settled within 1.2x of the first step's (BENCHMARKS.md "Issue #21, session 35"). Without
    any trim, though, a process once grew past 17 GB over a long run (memory allocator section).
    So the trim is kept for growth: :meth:`after_step` trims only when the resident memory at a
    step's end exceeds ``growth`` times what it was at the end of the first step after the start
    or after the last trim (that step's working set, freed pages included), and measures anew
    after trimming, so that a stage of longer examples raises the limit instead of trimming at
    every step. ``resident`` and ``trim`` are what it reads and calls (tests give their own).
    """

    def __init__(
        self,
        growth: float = 1.5,
        resident: Callable[[], int | None] | None = None,
        trim: Callable[[], None] | None = None,
    ) -> None:
        self.growth = growth
        self.resident = resident or (lambda: resident_bytes())  # looked up when called
        self.trim = trim or (lambda: release_freed_memory())
        self.limit: float | None = None
        self.trims = 0
        self.size: int | None = None  # the resident bytes read at the last step's end

    def after_step(self) -> bool:
        """Call at the end of each training step; returns whether it trimmed."""
        size = self.size = self.resident()
        if size is None:
            return False
        if self.limit is None:
            self.limit = self.growth * size
            return False
        if size <= self.limit:
            return False
        self.trim()
        self.trims += 1
        self.limit = None  # set again from the next step's working set
        return True


# madvise(2)'s advice to reclaim the pages of a range now (Linux 5.4 and later).
MADV_PAGEOUT = 21


def file_mapped_ranges(maps_text: str) -> list[tuple[int, int]]:
    """The address ranges ``[start, end)`` of ``/proc/PID/maps`` text that map a file (a path, not
    an anonymous region or a kernel one such as ``[heap]``)."""
    ranges = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def whole_pages(start: int, nbytes: int, page: int) -> tuple[int, int] | None:
    """The page-aligned ``(address, length)`` of the whole pages inside ``[start, start + nbytes)``,
    or ``None`` when it holds no whole page (the pages at its edges may hold other data)."""
    first = -(-start // page) * page
    last = (start + nbytes) // page * page
    return (first, last - first) if last > first else None


class FilePages:
    """Hands the kernel back the pages of tensors that lie in a file this process maps (weights
    that ``safetensors`` loaded by ``mmap``), where Linux can take the advice (``MADV_PAGEOUT``).

    Why: holding a LoRA student's frozen weights in bf16 for training (kpod.models.frozen_linears_in)
    reads the float32 weights once, which makes their file pages resident, and there they stayed
    for the whole run: about 400 MB of a 135M student's peak memory, for values no step reads. The
    advice loses nothing: the pages are the file's, unchanged (frozen weights are never written),
    and a later read (the weights put back for evaluation) faults them in again from the file.
    Pages of private memory that a process did write are swapped, never dropped, so even a wrong
    call costs time, not data. Tensors outside a file mapping, and systems without the call, are
    left alone; a file on a memory file system (tmpfs) keeps its pages, having no disk to drop
    them to. ``maps`` is read once, when the object is made."""

    def __init__(self, maps: Path = Path("/proc/self/maps")) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.madvise: Any = None
        try:
            self.ranges = file_mapped_ranges(maps.read_text())
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.madvise = libc.madvise
        except (OSError, AttributeError):
            self.ranges = []
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.released = 0  # bytes advised so far

    def release(self, tensor: Any) -> int:
        """Advise the whole pages of ``tensor``'s storage out, if they lie in one file mapping;
        returns how many bytes the kernel took the advice for (0 otherwise)."""
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
        if not self.ranges or not any(lo <= start and start + nbytes <= hi for lo, hi in self.ranges):
            return 0
        span = whole_pages(start, nbytes, self.page)
        if span is None or self.madvise(span[0], span[1], MADV_PAGEOUT) != 0:
            return 0
        self.released += span[1]
        return span[1]


def allocator_in(mapped_paths: Iterable[str]) -> str | None:
    """The fast allocator among a process's loaded libraries (lines of ``/proc/PID/maps`` or
    paths), or ``None`` when there is none (the C library's malloc)."""
    names = [Path(p.split()[-1]).name for p in mapped_paths if p.strip()]
    for allocator, fragment in FAST_ALLOCATORS.items():
        if any(name.startswith(fragment) for name in names):
            return allocator
    return None


def current_allocator(maps: Path = Path("/proc/self/maps"), env: Mapping[str, str] | None = None) -> str:
    """``jemalloc``, ``tcmalloc`` or ``mimalloc`` when one is loaded in this process, else
    ``system`` (glibc's malloc on Linux). Reads ``/proc/self/maps``; elsewhere, ``LD_PRELOAD``."""
    env = os.environ if env is None else env
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        lines = env.get("LD_PRELOAD", "").replace(":", " ").split()
    return allocator_in(lines) or "system"


def find_fast_allocator(dirs: Iterable[str | os.PathLike[str]] = LIBRARY_DIRS) -> Path | None:
    """The first installed jemalloc, tcmalloc or mimalloc shared library, or ``None``."""
    for name in LIBRARY_FILES:
        for directory in dirs:
            path = Path(directory) / name
            if path.is_file():
                return path
    return None


def cpu_allocator_hint(
    allocator: str | None = None, library: Path | None = None, libc: str | None = None
) -> str | None:
    """One line advising a faster allocator for a long CPU run, or ``None`` when there is nothing
    to advise: one is loaded already, or the C library is not glibc (macOS, musl), whose heap is
    the one measured to fragment. ``libc`` defaults to ``glibc`` when :func:`glibc` finds it."""
    libc = ("glibc" if glibc() is not None else "") if libc is None else libc
    allocator = allocator or current_allocator()
    if libc != "glibc" or allocator != "system":
        return None
    if library is None:
        library = find_fast_allocator()
    how = (
        f"LD_PRELOAD={library} before the command"
        if library is not None
        else "install jemalloc (Debian/Ubuntu: apt-get install libjemalloc2) and preload it with LD_PRELOAD"
    )
    return (
        "note: CPU training under glibc malloc slows down as its heap fragments (measured: 130 to 60 "
        f"tokens/s within 40 min); to avoid it, with the same results, {how} (the kpod command "
        f"does so itself unless LD_PRELOAD or {OPT_OUT_VARIABLE}=0 is set; BENCHMARKS.md, Memory allocator)"
    )


def fast_allocator_preload(
    env: Mapping[str, str], allocator: str, library: Path | None, libc: str
) -> str | None:
    """The ``LD_PRELOAD`` value to restart this process with, so that it runs on a fast allocator,
    or ``None`` to run on as it is.

    ``None`` when the user opted out (``KPOD_FAST_MALLOC`` set to 0, false, no or off; a value
    that is neither that nor 1, true, yes or on is a :class:`~kpod.errors.ConfigError`), when the C
    library is not glibc (macOS, musl: its heap is the one measured to fragment), when a fast
    allocator is loaded already (``allocator`` is not ``system``), when none is installed, or when
    ``LD_PRELOAD`` is set at all: what the user preloads is kept as it is, and a restarted process,
    which has it set, never restarts again, even where the library failed to load.
    """
    choice = env.get(OPT_OUT_VARIABLE, "").strip().lower()
    if choice not in {"", "1", "true", "yes", "on", "0", "false", "no", "off"}:
        from kpod.errors import ConfigError

        raise ConfigError(
            f"{OPT_OUT_VARIABLE}={env[OPT_OUT_VARIABLE]!r} in the environment: use 0 (keep the C "
            "library's malloc) or 1 (preload jemalloc where installed, the default)"
        )
    if choice in {"0", "false", "no", "off"}:
        return None
    if libc != "glibc" or allocator != "system" or library is None:
        return None
    if env.get("LD_PRELOAD", "").strip():
        return None
    return str(library)


def restart_on_fast_allocator(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    execve: Callable[[str, list[str], dict[str, str]], Any] = os.execve,
) -> None:
    """Replace this Python process by the same command with jemalloc (or tcmalloc, mimalloc)
    preloaded, when :func:`fast_allocator_preload` says so; returns only when it does not.

    Call it before any work: the new process starts from the beginning, with the same
    interpreter, interpreter options and arguments (``argv``, default ``sys.orig_argv``), open
    files and environment plus ``LD_PRELOAD``. It costs one more interpreter start (about 0.2 s
    here) against a training run that slows as glibc's heap fragments (module docstring).
    """
    env = dict(os.environ if env is None else env)
    libc = "glibc" if glibc() is not None else ""
    preload = fast_allocator_preload(env, current_allocator(env=env), find_fast_allocator(), libc)
    if preload is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    env["LD_PRELOAD"] = preload
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *argv[1:]], env)
