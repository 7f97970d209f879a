#!/usr/bin/env bash
# README command 2: set up, then lint (ruff) and run the test suite (pytest).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
echo "[test] ruff check + format check"
ruff check .
ruff format --check .
echo "[test] pytest"
python -m pytest -q "$@"
