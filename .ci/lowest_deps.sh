#!/usr/bin/env bash
# The tests that need no arcface_torch checkout, with every dependency at setup.py's floor
# (.ci/lowest-deps.txt) and torch at TORCH (default 2.13.0, CPU), in a throwaway venv.
#   .ci/lowest_deps.sh [VENV_DIR]        PYTHON=python3.11 TORCH=2.13.0 by default
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu  for the CPU wheel;
#   TORCH_SITE=/other/venv/lib/python3.11/site-packages  to reuse an installed torch instead
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/otface-lowest-deps}
PYTHON=${PYTHON:-python3.11}
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "${TORCH_SITE:-}" ]; then
    # reuse the torch of another environment (no 200 MB download): its site-packages go last on sys.path
    # (before the installs, so that pip sees torch there and geomloss does not pull another one)
    site=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
    echo "$TORCH_SITE" > "$site/zz_torch_from_elsewhere.pth"
else
    "${pip[@]}" "torch==${TORCH:-2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
"${pip[@]}" --only-binary numpy,scipy,pillow,matplotlib,pot,pyyaml -r .ci/lowest-deps.txt "scipy==1.9.2"
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|numpy|pillow|tqdm|pyyaml|easydict|pytest|pot|geomloss|matplotlib|scipy) '
unset ARCFACE_TORCH_DIR
PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not upstream and not slow" tests/
