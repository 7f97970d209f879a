#!/usr/bin/env bash
# README command 1: set up, train the default recipe on the embedded default (MobileNetV2 ->
# Q-Former -> SmolLM2 + LoRA on easy-VQA), then evaluate on the full easy-VQA test split.
# Usage: bash scripts/quickstart.sh [RUN_DIR] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
run=${1:-runs/easyvqa-$(date +%Y%m%d-%H%M%S)}
shift || true
adaptkit train recipes/easyvqa_qformer_lora.yaml output_dir="$run" "$@"
adaptkit eval "$run" --data easyvqa:test --json | tee "$run/quickstart_eval.json"
echo "[quickstart] run directory: $run; wall time $(( $(date +%s) - start )) s"
