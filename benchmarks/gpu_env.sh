#!/usr/bin/env bash
# Build the one venv `make gpu-check` needs on a fresh GPU machine, from PyPI pins only.
#
# One interpreter serves both roles of benchmarks/gpu_check.py: the check itself (pytest, POT,
# geomloss, the plugin) and the recipe's training runs (mxnet 1.9.1 needs numpy 1.23.5; onnx,
# onnxruntime, insightface for the export check). The pins are those of the CPU training env the
# CPU tests run in (docs/integration.md), with PyPI's CUDA build of torch.
#
# Usage: bash benchmarks/gpu_env.sh [VENV]          (default VENV: .gpu-venv)
#   PYTHON=python3.11   interpreter for the venv (mxnet 1.9.1 wheels: Python <= 3.11)
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"   override, e.g. with
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 for an older driver: PyPI's
#   torch 2.14.1 wheel is built for CUDA 13 (driver >= 580).
# No internet? Skip this script and point the check at an existing interpreter instead:
#   OTFACE_TRAIN_PYTHON=/path/python GPU_PYTHON=/path/python make gpu-check
# (it needs: torch with CUDA, torchvision, numpy<2 + mxnet for the .rec reader of the recipe,
#  pytest, POT, geomloss, onnx, onnxruntime, insightface, opencv, scikit-learn, scipy,
#  tensorboard, easydict, pyyaml, pillow).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.gpu-venv}"
PY="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

command -v "$PY" >/dev/null || { echo "gpu_env.sh: $PY not found (set PYTHON=...)" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_SPEC
"${PIP[@]}" numpy==1.23.5 mxnet==1.9.1 easydict==1.14 PyYAML==6.0.4 scikit-learn==1.7.2 scipy==1.15.3 \
    tensorboard==2.21.0 onnx==1.23.2 onnxruntime==1.32.0 opencv-python-headless==4.11.0.86 \
    insightface==2.1 pillow==13.0.0 matplotlib==3.10.9 timm==1.0.31 \
    POT==0.9.7.post1 geomloss==0.3.1 pytest==9.2.0
# the plugin itself, without letting pip touch the pins above
"${PIP[@]}" --no-deps -e "$REPO"
"$VENV/bin/python" - <<'EOF'
import numpy, torch, mxnet, ot, geomloss, insightface, onnxruntime  # noqa: F401
print(f"gpu env ready: torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {numpy.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
EOF
echo "run: OTFACE_TRAIN_PYTHON=$VENV/bin/python GPU_PYTHON=$VENV/bin/python make gpu-check"
