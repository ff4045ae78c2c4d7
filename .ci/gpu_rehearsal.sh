#!/usr/bin/env bash
# The recipe on a current stack, and a rehearsal of the GPU check as the lent GPU machine runs it.
#
# A Python 3.12 venv with the GPU machine's own packages (benchmarks/gpu_machine.txt: torch 2.11,
# numpy 2.5, no mxnet, no POT/geomloss/easydict/insightface), from the package index; then, with the
# network unused, the GPU kit (benchmarks/gpu_kit.sh) installed with pip --no-index --target, and:
#   1. the patched recipe's end-to-end tests in that venv: 2 gloo processes of train_v2.py with
#      loss: otface, resume, torch2onnx.py, insightface loading the export; MXFaceDataset/load_bin
#      through the plugin's reader (tests/integration/test_recipe_train.py -k mbf, test_recipe_recordio.py);
#   2. benchmarks/gpu_run.sh --device cpu --smoke: every stage of the GPU check, none skipped.
#
# Usage: .ci/gpu_rehearsal.sh
#   OTFACE_MODERN_ENV=/path/venv   reuse/keep that venv (default: a temp dir, removed on exit)
#   PYTHON312=/path/python3.12     the interpreter (default: python3.12 on PATH, else pyenv's 3.12)
#   PYTHON=...                     the plugin's own interpreter, which builds the kit (default .venv/bin/python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/otface-rehearsal.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# The rehearsal trains the recipe: without one (no ARCFACE_TORCH_DIR, no shared export beside the
# checkout) it skips with the reason, as the upstream tests of `make test` do.
UPSTREAM="$(cd "$REPO" && "${PYTHON:-.venv/bin/python}" -c 'import sys; sys.path.insert(0, "tests"); import conftest; print(conftest.UPSTREAM or "")')"
if [[ -z "$UPSTREAM" || ! -f "$UPSTREAM/train_v2.py" ]]; then
    echo "[rehearsal] no arcface_torch recipe (ARCFACE_TORCH_DIR unset, no shared export): skipped"
    exit 0
fi

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then echo "$PYTHON312"; return; fi
    if python3.12 -c 'import sys' 2>/dev/null; then command -v python3.12; return; fi
    local p
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [[ -x "$p" ]]; then echo "$p"; return; fi
    done
    echo "gpu_rehearsal.sh: no Python 3.12 found (set PYTHON312)" >&2
    exit 2
}

VENV="${OTFACE_MODERN_ENV:-$TMP/venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    PY312="$(find_python312)"
    echo "[rehearsal] creating $VENV with $("$PY312" --version 2>&1)"
    "$PY312" -m venv "$VENV"
fi
echo "[rehearsal] installing the GPU machine's packages (benchmarks/gpu_machine.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/benchmarks/gpu_machine.txt"
"$VENV/bin/python" - <<'PYEOF'
import importlib.util, sys
import numpy, torch
assert sys.version_info[:2] == (3, 12), sys.version
assert int(numpy.__version__.split(".")[0]) >= 2, numpy.__version__
for absent in ("mxnet", "ot", "geomloss", "easydict", "insightface"):
    assert importlib.util.find_spec(absent) is None, f"{absent} must not be in the GPU machine's packages"
print(f"[rehearsal] Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, no mxnet")
PYEOF

KIT="$TMP/kit"
bash "$REPO/benchmarks/gpu_kit.sh" "$KIT" 2>&1 | grep -v "^WARNING: Location"

# From here on, nothing comes from the network: the kit is installed with --no-index.
SITE="$TMP/site"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$SITE" "$KIT"/wheels/*.whl
cd "$REPO"
echo "[rehearsal] the patched recipe on this stack (tests, 2 gloo processes)"
PYTHONPATH="$REPO:$SITE" OTFACE_TRAIN_PYTHON="$VENV/bin/python" OMP_NUM_THREADS=1 \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= -W "ignore::DeprecationWarning" -m upstream -rs \
    tests/integration/test_recipe_train.py tests/integration/test_recipe_recordio.py \
    -k "recordio or (mbf and (two_process or resume or export))"

echo "[rehearsal] the GPU check, as the GPU machine runs it, on the CPU"
OUT="$TMP/gpu-smoke" KIT="$KIT" SITE="$TMP/site-run" PYTHON="$VENV/bin/python" \
    bash "$REPO/benchmarks/gpu_run.sh" --device cpu --smoke
"$VENV/bin/python" - "$TMP/gpu-smoke/gpu.json" <<'PYEOF'
import json, sys
res = json.load(open(sys.argv[1]))
print("[rehearsal] | stage | status | seconds |")
for name, r in res["stages"].items():
    print(f"[rehearsal] | {name} | {r['status']} | {r['seconds']:.0f} |")
bad = {n: r["status"] for n, r in res["stages"].items() if r["status"] not in ("pass", "n/a")}
assert not bad, f"stages not passing: {bad}"
PYEOF
