#!/usr/bin/env bash
# The GPU check on the lent GPU machine, offline: install the kit's wheels (benchmarks/gpu_kit.sh) with
# pip --no-index into a --target folder, then run benchmarks/gpu_check.py on the kit's recipe and .rec,
# with the machine's own python3 as the training interpreter (no mxnet: the recipe reads the .rec through
# the plugin). Writes OUT (default results/gpu): REPORT.md and gpu.json.
#
# Usage: bash benchmarks/gpu_run.sh [gpu_check.py args]     e.g. --device cpu --smoke (the rehearsal)
#   KIT=.gpu-kit   OUT=results/gpu   PYTHON=python3   SITE=/tmp/otface-site
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${KIT:-$REPO/.gpu-kit}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/otface-site}"
[[ -d "$KIT/wheels" ]] || { echo "gpu_run.sh: no kit at $KIT (build it with benchmarks/gpu_kit.sh and carry it)" >&2; exit 2; }

rm -rf "$SITE"
"$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$KIT"/wheels/*.whl
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export ARCFACE_TORCH_DIR="$KIT/arcface_torch" OTFACE_TRAIN_PYTHON="$(command -v "$PY")"
export PYTHONUNBUFFERED=1
exec "$PY" "$REPO/benchmarks/gpu_check.py" --kit "$KIT" --strict --out "${OUT:-$REPO/results/gpu}" "$@"
