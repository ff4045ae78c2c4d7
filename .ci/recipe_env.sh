#!/usr/bin/env bash
# The upstream-dependent tests, against the real arcface_torch recipe, in the recipe's own
# training environment (its own venv: mxnet needs numpy 1.23.5, the ViTs need timm).
#
# The recipe: $ARCFACE_TORCH_DIR, else ../shared/upstream/<pins.SHARED_EXPORT> beside the
# checkout (tests/conftest.py decides; tests patch only temporary copies). Without either, the
# environment is not built and the tests are not run (they skip with that reason in `make test`).
#
# Usage: .ci/recipe_env.sh [extra pytest args]
#   OTFACE_RECIPE_ENV=/path/to/venv  reuse/keep that venv (default: a temp dir, removed on exit)
#   PYTHON=python3.11                interpreter for the venv (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SHARED_RECIPE="$REPO/../shared/upstream/$(cd "$REPO" && "$PY" -m otface_plugin.arcface_torch.pins export)"

if [[ -z "${ARCFACE_TORCH_DIR:-}" && ! -f "$SHARED_RECIPE/train_v2.py" ]]; then
    echo "[recipe-env] no arcface_torch recipe (ARCFACE_TORCH_DIR unset, $SHARED_RECIPE absent):" \
         "not building the environment; the upstream-dependent tests skip"
    # Run them anyway with the plugin's own interpreter, so each says why it skipped.
    cd "$REPO"
    exec "${OTFACE_MAIN_PYTHON:-python3}" -m pytest -q -p no:cacheprovider -m upstream -rs tests "$@"
fi

if [[ -n "${OTFACE_RECIPE_ENV:-}" ]]; then
    VENV="$OTFACE_RECIPE_ENV"
else
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/otface-recipe-env.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    VENV="$TMP/venv"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[recipe-env] creating venv $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi
echo "[recipe-env] installing .ci/recipe_env.txt and the plugin"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/.ci/recipe_env.txt"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$REPO"

# Fail loudly here: with a broken environment the tests would only be skipped.
"$VENV/bin/python" -W ignore - <<'PYEOF'
import mxnet, numpy, timm, torch, onnxruntime, insightface, sklearn, tensorboard
assert numpy.__version__ == "1.23.5", numpy.__version__
print(f"[recipe-env] torch {torch.__version__}, numpy {numpy.__version__}, mxnet {mxnet.__version__}, "
      f"timm {timm.__version__}")
PYEOF

cd "$REPO"
# -W ignore::DeprecationWarning: `import mxnet` warns on numpy's deprecated aliases.
OTFACE_TRAIN_PYTHON="$VENV/bin/python" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= -W "ignore::DeprecationWarning" \
    -m upstream -rs tests "$@"
