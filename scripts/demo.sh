#!/usr/bin/env bash
# make demo: the main job on the offline default, end to end.
#
# `kpod run configs/quickstart.yaml`: GSM8K-style problems generated offline (reasoning-gym's
# gsm_symbolic), token weights learned by mask learning, step difficulty and the progressive
# schedule, then the offline SmolLM2-135M-Instruct student distilled with KPOD and with standard
# CoT distillation under the same budget, both scored on held-out problems beside the untrained
# student. Ends with the three accuracies and the path of the HTML report.
# Run it again to resume after an interruption; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
# The kpod command restarts itself on jemalloc where it is installed (kpod.allocator).
exec .venv/bin/kpod run configs/quickstart.yaml "$@"
