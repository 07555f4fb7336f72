#!/usr/bin/env bash
# Two one-thread training processes side by side against one two-thread process (what `kpod run`'s
# jobs: 2 relies on): the real loop's tokens/s of std-cot and kpod (benchmarks/throughput.py, variant
# new), first one process with all threads, then two with OMP_NUM_THREADS=1 started together.
# Prints each row; the rows and ratios of session 28 are in results/streams-threads-session28.json.
#
#   bash benchmarks/side_by_side.sh            # logs in runs/logs/side-by-side-*.log
#
# throughput.py stores --train-rows runs in results/throughput.json; the file is put back as it was
# afterwards (two processes write it at once here).
set -euo pipefail
cd "$(dirname "$0")/.."
lib="$(.venv/bin/python -c 'from kpod.allocator import find_fast_allocator as f; print(f() or "")')"
if [ -n "$lib" ]; then export LD_PRELOAD="$lib"; fi
mkdir -p runs/logs
saved="$(mktemp)"
cp benchmarks/results/throughput.json "$saved"
run=(.venv/bin/python benchmarks/throughput.py --train-rows --variants new --steps 6 --rounds 1 --skip-trl --skip-eval)
"${run[@]}" --out /tmp/side-by-side/t2 > runs/logs/side-by-side-t2.log 2>&1
OMP_NUM_THREADS=1 "${run[@]}" --out /tmp/side-by-side/p1 > runs/logs/side-by-side-p1.log 2>&1 &
a=$!
OMP_NUM_THREADS=1 "${run[@]}" --out /tmp/side-by-side/p2 > runs/logs/side-by-side-p2.log 2>&1 &
b=$!
wait "$a" "$b"
cp "$saved" benchmarks/results/throughput.json
grep -h "^new " runs/logs/side-by-side-t2.log runs/logs/side-by-side-p1.log runs/logs/side-by-side-p2.log
