#!/usr/bin/env bash
# `make setup` of two commits in fresh clones, alternated, back to back: wall time and .pyc count.
#
#     bash benchmarks/setup_time.sh OLD_REV NEW_REV [ROUNDS]
#
# Each round clones this repository twice into /tmp (setup-old-N, setup-new-N, replaced if there),
# checks out each commit and times `make setup` there; one line per set-up on stdout. The clones are
# left for a look (`benchmarks/bytecode_coverage.py` reads their .venv).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
old="$(git -C "$repo" rev-parse "$1")" new="$(git -C "$repo" rev-parse "$2")" rounds="${3:-2}"
for round in $(seq "$rounds"); do
  for side in old new; do
    rev=$old; [ "$side" = new ] && rev=$new
    dir=/tmp/setup-$side-$round
    rm -rf "$dir"
    git clone -q "$repo" "$dir" && git -C "$dir" checkout -q "$rev"
    start=$(date +%s.%N)
    (cd "$dir" && make setup > "$dir.log" 2>&1)
    end=$(date +%s.%N)
    printf 'round %s %s %s setup %.1f s pyc %s\n' "$round" "$side" "${rev:0:7}" \
      "$(echo "$end - $start" | bc)" "$(find "$dir/.venv" -name '*.pyc' | wc -l)"
  done
done
