#!/usr/bin/env bash
# make demo: the main job on the offline default. Until `kpod run` exists (issue #7) it runs the
# stages that exist, on offline data and the offline SmolLM2-135M-Instruct student:
#   1. GSM8K-style problems (reasoning-gym gsm_symbolic), read and checked as training will;
#   2. synthetic problems with ground-truth keypoints;
#   3. token weighting by mask learning on them, its keypoint ROC-AUC, and a heat-map to open.
set -euo pipefail
cd "$(dirname "$0")/.."
KPOD=.venv/bin/kpod
OUT=runs/demo
mkdir -p "$OUT"
echo "== 1. offline GSM8K-style problems (reasoning-gym gsm_symbolic), as GSM8K JSONL"
$KPOD data synth gsm-symbolic -n 500 --seed 0 --out "$OUT/gsm_symbolic.jsonl"
$KPOD data stats "$OUT/gsm_symbolic.jsonl"
echo
echo "== 2. synthetic arithmetic problems with ground-truth keypoints"
$KPOD data synth arithmetic -n 96 --seed 0 --out "$OUT/arithmetic.jsonl"
$KPOD data stats "$OUT/arithmetic.jsonl" --tokenizer smollm2-135m-instruct
echo
echo "== 3. token weighting (paper Eqs. 2-7) with the offline student; a short run (12 steps)"
$KPOD weights train "$OUT/arithmetic.jsonl" --out "$OUT/weights" --normalize-mask-loss --batch-size 8
$KPOD weights eval "$OUT/arithmetic.jsonl" "$OUT/weights"
$KPOD weights show "$OUT/arithmetic.jsonl" "$OUT/weights" -n 2
$KPOD weights show "$OUT/arithmetic.jsonl" "$OUT/weights" -n 20 --html "$OUT/keypoints.html"
echo
echo "Open $OUT/keypoints.html to see which tokens the module learned to keep."
echo "(A short run on purpose: longer runs currently drift towards masking everything; see BENCHMARKS.md.)"
