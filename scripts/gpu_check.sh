#!/usr/bin/env bash
# GPU readiness in one short run (under 8 minutes on one H200): CUDA training paths (fp32, bf16 autocast,
# bf16 weights, 8-bit, 4-bit), device placement, the throughput benchmark against the bf16 matmul peak, the
# 4-bit vs bf16 allocator peak, and a SigLIP-base + Qwen2.5-0.5B-sized configuration from random weights.
# Writes reports/gpu_check.json (rewritten after every section). Without CUDA it runs the CPU-feasible
# parts and records the rest as skipped. Extra arguments go to benchmarks/gpu_check.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python benchmarks/gpu_check.py "$@"
