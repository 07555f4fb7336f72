"""Which allocator the process runs on, where a faster one is, and the hint the trainer prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kpod.allocator import (
    FilePages,
    HeapTrimmer,
    allocator_in,
    cpu_allocator_hint,
    current_allocator,
    fast_allocator_preload,
    file_mapped_ranges,
    find_fast_allocator,
    resident_bytes,
    restart_on_fast_allocator,
    whole_pages,
)
from kpod.errors import ConfigError

# The tests that start a real process on a fast allocator.
needs_fast_allocator = pytest.mark.skipif(
    find_fast_allocator() is None or not Path("/proc/self/maps").exists(),
    reason="no jemalloc/tcmalloc/mimalloc installed (Debian: apt-get install libjemalloc2; .ci/run does)",
)

GLIBC_MAPS = [
    "7f0000000000-7f0000100000 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6",
    "7f0000200000-7f0000300000 r-xp 00000000 08:01 124 /usr/lib/x86_64-linux-gnu/libm.so.6",
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
    "",
]


def test_allocator_in_reads_maps_lines_and_paths():
    assert allocator_in(GLIBC_MAPS) is None
    jemalloc = "7f1-7f2 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    assert allocator_in([*GLIBC_MAPS, jemalloc]) == "jemalloc"
    assert allocator_in(["/usr/lib64/libtcmalloc_minimal.so.4"]) == "tcmalloc"
    assert allocator_in(["/opt/lib/libmimalloc.so.2"]) == "mimalloc"
    # a path that merely contains the name is not the library
    assert allocator_in(["/home/me/libjemalloc-notes/libc.so.6"]) is None


def test_current_allocator_reads_maps_else_ld_preload(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("\n".join(GLIBC_MAPS))
    assert current_allocator(maps, env={"LD_PRELOAD": "/x/libjemalloc.so.2"}) == "system"  # maps win
    maps.write_text("\n".join([*GLIBC_MAPS, "1-2 r-xp 0 0:0 1 /usr/lib/libtcmalloc.so.4"]))
    assert current_allocator(maps, env={}) == "tcmalloc"
    missing = tmp_path / "no-such-maps"
    assert current_allocator(missing, env={"LD_PRELOAD": "/a/libfoo.so:/x/libjemalloc.so.2"}) == "jemalloc"
    assert current_allocator(missing, env={}) == "system"


def test_find_fast_allocator_prefers_jemalloc_and_returns_none_when_absent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert find_fast_allocator([a, b]) is None
    (a / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_fast_allocator([a, b]) == a / "libtcmalloc_minimal.so.4"
    (b / "libjemalloc.so.2").write_bytes(b"")
    assert find_fast_allocator([a, b]) == b / "libjemalloc.so.2"


def test_hint_only_under_glibc_and_says_how():
    lib = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    with_lib = cpu_allocator_hint("system", lib, "glibc")
    assert with_lib is not None and f"LD_PRELOAD={lib}" in with_lib
    without = cpu_allocator_hint("system", None, "glibc")
    if find_fast_allocator() is None:  # nothing to point at: say what to install
        assert without is not None and "apt-get install libjemalloc2" in without
    assert cpu_allocator_hint("jemalloc", lib, "glibc") is None
    assert cpu_allocator_hint("system", lib, "") is None  # no glibc (macOS)
    assert cpu_allocator_hint("system", lib, "musl") is None


@needs_fast_allocator
def test_a_preloaded_allocator_is_seen_in_a_real_process():
    code = (
        "from kpod.allocator import current_allocator as c, cpu_allocator_hint as h; print(c(), h() is None)"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lib = find_fast_allocator()
    preloaded = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "LD_PRELOAD": str(lib)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout.split() == ["system", "False"]
    assert preloaded.stdout.split() == [allocator_in([str(lib)]), "True"]


def test_fast_allocator_preload_only_where_it_helps_and_nothing_is_preloaded():
    lib = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert fast_allocator_preload({}, "system", lib, "glibc") == str(lib)
    assert fast_allocator_preload({"KPOD_FAST_MALLOC": "1"}, "system", lib, "glibc") == str(lib)
    for off in ("0", "false", "No", " off "):
        assert fast_allocator_preload({"KPOD_FAST_MALLOC": off}, "system", lib, "glibc") is None
    assert fast_allocator_preload({}, "jemalloc", lib, "glibc") is None  # loaded already
    assert fast_allocator_preload({}, "system", None, "glibc") is None  # none installed
    assert fast_allocator_preload({}, "system", lib, "") is None  # not glibc (macOS)
    # the user's own preload is kept, and a restarted process (LD_PRELOAD set) never restarts again,
    # even where the library did not load
    assert fast_allocator_preload({"LD_PRELOAD": "/opt/libfoo.so"}, "system", lib, "glibc") is None
    assert fast_allocator_preload({"LD_PRELOAD": str(lib)}, "system", lib, "glibc") is None
    assert fast_allocator_preload({"LD_PRELOAD": " "}, "system", lib, "glibc") == str(lib)
    with pytest.raises(ConfigError, match="KPOD_FAST_MALLOC='maybe' in the environment: use 0"):
        fast_allocator_preload({"KPOD_FAST_MALLOC": "maybe"}, "jemalloc", None, "")


def test_restart_execs_the_same_command_with_the_preload(monkeypatch, tmp_path):
    import kpod.allocator as allocator

    lib = tmp_path / "libjemalloc.so.2"
    monkeypatch.setattr(allocator, "find_fast_allocator", lambda: lib)
    monkeypatch.setattr(allocator, "current_allocator", lambda env=None: "system")
    monkeypatch.setattr(allocator, "glibc", lambda: object())
    calls = []
    argv = ["/usr/bin/python3", "-X", "utf8", "/venv/bin/kpod", "distill", "--config", "a b.yaml"]
    restart_on_fast_allocator(argv, {"HOME": "/h"}, execve=lambda *a: calls.append(a))
    assert calls == [(sys.executable, [sys.executable, *argv[1:]], {"HOME": "/h", "LD_PRELOAD": str(lib)})]
    calls.clear()
    restart_on_fast_allocator(argv, {"KPOD_FAST_MALLOC": "0"}, execve=lambda *a: calls.append(a))
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    restart_on_fast_allocator(argv, {}, execve=lambda *a: calls.append(a))
    assert calls == []


@needs_fast_allocator
def test_a_restarted_process_runs_on_the_fast_allocator_and_the_opt_out_keeps_malloc():
    code = (
        "import sys; from kpod.allocator import restart_on_fast_allocator as r, current_allocator as c; "
        "print('start', flush=True); r(); print(c(), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KPOD_FAST_MALLOC")}
    restarted = subprocess.run(
        [sys.executable, "-c", code, "x y", "z"], env=env, capture_output=True, text=True, check=True
    )
    kept = subprocess.run(
        [sys.executable, "-c", code, "x y"],
        env={**env, "KPOD_FAST_MALLOC": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    lib = find_fast_allocator()
    # the first process printed 'start' before it was replaced; the second one started again
    assert restarted.stdout.splitlines() == ["start", "start", f"{allocator_in([str(lib)])} ['x y', 'z']"]
    assert kept.stdout.splitlines() == ["start", "system ['x y']"]


def test_trainlog_splits_a_resumed_runs_log_into_labelled_sittings(load_benchmark, tmp_path):
    bench = load_benchmark("allocator")
    # steps 1-4 at 100 tokens/s, then a resumed sitting from step 5 at 200 tokens/s
    rows = [{"step": s, "tokens": 100 * s, "step_s": s / (1 if s < 5 else 2)} for s in range(1, 9)]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = bench.trainlog(log, starts=[5], labels=["glibc", "jemalloc"], window=2)
    assert [s["allocator"] for s in out["sittings"]] == ["glibc", "jemalloc"]
    assert [s["steps"] for s in out["sittings"]] == [[1, 4], [5, 8]]
    assert [s["tokens_per_s"] for s in out["sittings"]] == [100.0, 200.0]
    assert [w["steps"] for w in out["sittings"][1]["windows"]] == [[5, 6], [7, 8]]
    with pytest.raises(SystemExit, match="2 sittings in the log, 3 labels"):
        bench.trainlog(log, starts=[5], labels=["a", "b", "c"], window=2)


def test_heap_trimmer_trims_only_past_its_growth_limit_and_measures_anew_after():
    sizes = iter([100, 120, 140, 151, 90, 130, 136, 500])
    trims = []
    trimmer = HeapTrimmer(growth=1.5, resident=lambda: next(sizes), trim=lambda: trims.append(1))
    done = [trimmer.after_step() for _ in range(8)]
    # 100 sets the limit (150); 151 passes it: trim; 90 sets the limit anew (135); 136 passes it.
    assert done == [False, False, False, True, False, False, True, False]
    assert trimmer.trims == len(trims) == 2 and trimmer.size == 500
    assert trimmer.limit == 750  # 500, the step after the trim, is the new working set


def test_heap_trimmer_does_nothing_where_memory_cannot_be_read():
    trims = []
    trimmer = HeapTrimmer(resident=lambda: None, trim=lambda: trims.append(1))
    assert not any(trimmer.after_step() for _ in range(3)) and not trims


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="no /proc (not Linux)")
def test_resident_bytes_reads_this_process():
    import resource

    size = resident_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, updated lazily
    assert 10 * 2**20 < size <= 1.1 * peak


def test_file_mapped_ranges_keep_file_mappings_only():
    maps = (
        "7f00000000-7f00001000 r--p 00000000 08:01 42   /cache/model.safetensors\n"
        "7f00002000-7f00004000 rw-p 00000000 00:00 0 \n"
        "55aa0000-55ab0000 rw-p 00000000 00:00 0      [heap]\n"
        "7f00005000-7f00006000 r-xp 00001000 08:01 43   /usr/lib/libc.so.6\n"
    )
    assert file_mapped_ranges(maps) == [(0x7F00000000, 0x7F00001000), (0x7F00005000, 0x7F00006000)]


def test_whole_pages_leave_the_partly_covered_edge_pages_out():
    assert whole_pages(4096, 8192, 4096) == (4096, 8192)
    assert whole_pages(4100, 8192, 4096) == (8192, 4096)  # both edge pages are shared with others
    assert whole_pages(4100, 4000, 4096) is None  # inside one page
    assert whole_pages(0, 4095, 4096) is None


def test_file_pages_of_a_mapped_tensor_leave_the_process_and_read_back_the_same(tmp_path):
    """A tensor mapped from a file, once read, holds its pages; released, the process's file pages
    drop by about its size and the tensor reads back the same values. Memory of the process's
    own (not a file's) is left alone."""
    import torch
    from tiny_models import memory_file_system, resident_file_mib

    if fs := memory_file_system(tmp_path):  # memory-backed files have no disk to drop their pages to
        pytest.skip(f"the test's files are on {fs} ({tmp_path})")
    n = 16 * 2**20  # 64 MiB of float32
    values = torch.arange(n, dtype=torch.float32) % 977
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    assert torch.equal(mapped, values)  # read: its pages are resident
    pages = FilePages()
    assert pages.release(values) == 0  # anonymous memory: no advice
    before = resident_file_mib()
    released = pages.release(mapped)
    if released == 0:
        pytest.skip("this kernel does not take MADV_PAGEOUT (Linux 5.4 and later)")
    assert released >= n * 4 - 2 * pages.page and pages.released == released
    assert before - resident_file_mib() > 0.9 * 64
    assert torch.equal(mapped, values)


@needs_fast_allocator
def test_release_freed_memory_purges_jemallocs_kept_pages_and_leaves_glibc_to_malloc_trim():
    """Under jemalloc the trainer's trim is jemalloc's purge (glibc's malloc_trim would act on a heap
    jemalloc does not use): with its decay off, 300 MiB freed stay resident until the purge."""
    lib = find_fast_allocator()
    if allocator_in([str(lib)]) != "jemalloc":
        pytest.skip("the fast allocator installed here is not jemalloc")
    code = (
        "from kpod.allocator import jemalloc_control, release_freed_memory, resident_bytes as r\n"
        "blocks = [bytearray(2**20) for _ in range(300)]\n"
        "full = r(); del blocks; freed = r(); release_freed_memory(); purged = r()\n"
        "print(jemalloc_control() is not None, (full - freed) >> 20, (freed - purged) >> 20)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    kept = {**env, "LD_PRELOAD": str(lib), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    out = subprocess.run([sys.executable, "-c", code], env=kept, capture_output=True, text=True, check=True)
    found, dropped_by_free, dropped_by_purge = out.stdout.split()
    assert found == "True"
    assert int(dropped_by_free) < 50  # jemalloc kept the freed pages
    assert int(dropped_by_purge) > 250  # and handed them back when asked
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert plain.stdout.split()[0] == "False"  # glibc: no jemalloc to ask; malloc_trim as before
