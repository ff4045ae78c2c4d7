#!/usr/bin/env bash
# Build the GPU kit here, for the lent GPU machine (Python 3.12, torch 2.11 + CUDA, numpy 2, no network,
# no POT/geomloss/easydict/insightface/mxnet; only files carried with the working tree, 64 MiB in all):
#   KIT/wheels/         the cp312 manylinux wheels of benchmarks/gpu_kit.txt (downloaded from the index)
#   KIT/arcface_torch/  the pinned recipe (ARCFACE_TORCH_DIR, else the shared export beside the checkout)
#   KIT/rec/            Extended Yale B, all identities at 112 px, as a .rec built by otface-data, and
#   KIT/face.pgm        one face for the export check (the face folders themselves are too large to carry)
# Then, on the GPU machine: bash benchmarks/gpu_run.sh (make gpu-check), carrying KIT.
#
# Usage: bash benchmarks/gpu_kit.sh [KIT]       (default .gpu-kit, git-ignored)
#   PYTHON=...   an interpreter with the plugin's dependencies (default .venv/bin/python, else python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${1:-$REPO/.gpu-kit}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
LIMIT_MIB=40  # kit + tracked files: well under the 64 MiB a device call carries

TMP="$KIT.partial"
rm -rf "$TMP"
mkdir -p "$TMP/wheels"
echo "[gpu-kit] wheels for cp312 manylinux x86_64: $(grep -v '^#' "$REPO/benchmarks/gpu_kit.txt" | xargs)"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$TMP/wheels" -r "$REPO/benchmarks/gpu_kit.txt"

UPSTREAM="$(cd "$REPO" && "$PY" -c 'import sys; sys.path.insert(0, "tests"); import conftest; print(conftest.UPSTREAM or "")')"
[[ -n "$UPSTREAM" && -f "$UPSTREAM/train_v2.py" ]] || { echo "[gpu-kit] no arcface_torch recipe (set ARCFACE_TORCH_DIR)" >&2; exit 2; }
cp -r "$UPSTREAM" "$TMP/arcface_torch"
chmod -R u+w "$TMP/arcface_torch"

FACES="$(cd "$REPO" && "$PY" -c 'import sys; sys.path.insert(0, "tests"); import conftest; print(conftest.faces_dir())')"
[[ -d "$FACES" ]] || { echo "[gpu-kit] face folders not found at $FACES (set OTFACE_FACES_DIR)" >&2; exit 2; }
PYTHONPATH="$REPO" "$PY" -m otface_plugin.data.cli build-rec "$FACES" "$TMP/rec/" --resize 112 --no-progress
first_face="$(find "$FACES" -name '*.pgm' | sort | sed -n 1p)"  # sed reads it all: no SIGPIPE under pipefail
cp "$first_face" "$TMP/face.pgm"

rm -rf "$KIT"
mv "$TMP" "$KIT"
kit_kib=$(du -sk "$KIT" | cut -f1)
tree_kib=$(cd "$REPO" && git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "[gpu-kit] $KIT: $((kit_kib / 1024)) MiB (wheels $(du -sk "$KIT/wheels" | cut -f1) KiB, recipe" \
     "$(du -sk "$KIT/arcface_torch" | cut -f1) KiB, rec $(du -sk "$KIT/rec" | cut -f1) KiB); tracked files" \
     "$((tree_kib / 1024)) MiB; together $(((kit_kib + tree_kib) / 1024)) MiB (limit $LIMIT_MIB MiB)"
if (( kit_kib + tree_kib > LIMIT_MIB * 1024 )); then
    echo "[gpu-kit] too large to carry with margin" >&2
    exit 1
fi
