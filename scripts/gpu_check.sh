#!/usr/bin/env bash
# The one-call GPU check (see scripts/gpu_check/__init__.py and docs/performance.md, "GPU check"):
#   scripts/gpu_check.sh OUT_DIR [--quick] [--only SECTIONS] [--budget SECONDS] ...
# Runs from any directory with the checkout on PYTHONPATH (no install needed); $PYTHON picks the
# interpreter (default python3, the one that holds torch on the GPU test machine).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: scripts/gpu_check.sh OUT_DIR [--quick] [--only SECTIONS] [--budget SECONDS]}"
shift
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # relative to the caller, not to the checkout
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m scripts.gpu_check --out "$out" "$@"
