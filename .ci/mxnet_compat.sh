#!/usr/bin/env bash
# Cross-compatibility of otface_plugin.data.recordio with real mxnet 1.9.1, in its own venv.
#
# mxnet 1.9.1 (the last release) imports only with numpy <= 1.23.5, which the plugin's own
# environment (numpy 2.x, torch) cannot share, so this builds a separate venv, installs
# mxnet==1.9.1 numpy==1.23.5 pillow pytest from PyPI, puts the repository on PYTHONPATH (the
# tests need only numpy + Pillow from the plugin, no torch) and runs tests/mxnet_compat.
#
# Usage: .ci/mxnet_compat.sh [extra pytest args]
#   OTFACE_MXENV=/path/to/venv  reuse/keep that venv (default: a temp dir, removed on exit)
#   PYTHON=python3.11           interpreter for the venv (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

if [[ -n "${OTFACE_MXENV:-}" ]]; then
    VENV="$OTFACE_MXENV"
else
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/otface-mxenv.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    VENV="$TMP/venv"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[mxnet-compat] creating venv $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi
echo "[mxnet-compat] installing mxnet==1.9.1 numpy==1.23.5 pillow pytest"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "mxnet==1.9.1" "numpy==1.23.5" pillow pytest

# Fail loudly here: if mxnet did not import, the tests would only be skipped.
"$VENV/bin/python" -W ignore - <<'PYEOF'
import mxnet, numpy
assert numpy.__version__ == "1.23.5", numpy.__version__
print(f"[mxnet-compat] mxnet {mxnet.__version__}, numpy {numpy.__version__}")
PYEOF

cd "$REPO"
# --confcutdir: project conftests above tests/mxnet_compat may import torch, absent here.
# -o addopts= / -W ignore: mxnet's DeprecationWarnings must not trip a warnings-as-errors setup.
OTFACE_REQUIRE_MXNET=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= \
    --confcutdir "$REPO/tests/mxnet_compat" -W "ignore::DeprecationWarning" \
    tests/mxnet_compat "$@"
