#!/usr/bin/env bash
# make demo: the main job on the offline default. Until `kpod run` exists (issue #7) it runs what
# the pipeline has: offline GSM8K-style data, read and checked the way training will read it.
set -euo pipefail
cd "$(dirname "$0")/.."
KPOD=.venv/bin/kpod
OUT=runs/demo
mkdir -p "$OUT"
echo "== offline GSM8K-style problems (reasoning-gym gsm_symbolic), as GSM8K JSONL"
$KPOD data synth gsm-symbolic -n 500 --seed 0 --out "$OUT/gsm_symbolic.jsonl"
$KPOD data stats "$OUT/gsm_symbolic.jsonl"
echo
echo "== synthetic arithmetic problems with ground-truth keypoints"
$KPOD data synth arithmetic -n 500 --seed 0 --out "$OUT/arithmetic.jsonl"
$KPOD data stats "$OUT/arithmetic.jsonl"
