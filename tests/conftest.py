"""Shared test fixtures: where the upstream recipe, the face images and the training interpreter are.

One place decides where the arcface_torch recipe comes from: ARCFACE_TORCH_DIR when set, else the
pristine export laid beside the checkout at ../shared/upstream/<pins.SHARED_EXPORT>. Tests only
ever patch a writable copy of it (the shared export is read-only in CI).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from otface_plugin.arcface_torch.pins import SHARED_EXPORT, UPSTREAM_SHORT

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_UPSTREAM = SHARED / "upstream" / SHARED_EXPORT
# what train_v2.py, eval/verification.py and torch2onnx.py import (mxnet is optional: without it the
# patched recipe reads .rec/.bin through otface_plugin.arcface_torch.mxnet_compat)
RECIPE_DEPS = "import sklearn, scipy, tensorboard, easydict, yaml, onnx, onnxruntime"


def pythonpath() -> str:
    """PYTHONPATH for subprocesses: the repository first, then what the caller had (the GPU kit's
    --target site, say)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def otface_data(*args) -> None:
    """``otface-data ARGS`` with this interpreter, the repository on the path; fails the test with
    the tool's error."""
    r = subprocess.run([sys.executable, "-m", "otface_plugin.data.cli", *map(str, args)],
                       env={**os.environ, "PYTHONPATH": pythonpath()}, capture_output=True, text=True)
    assert r.returncode == 0, f"otface-data {' '.join(map(str, args))}: {r.stderr}"


def upstream_root() -> Path | None:
    """The pristine recipe to copy from, or None (then upstream tests skip)."""
    env = os.environ.get("ARCFACE_TORCH_DIR")
    if env:
        return Path(env)
    return SHARED_UPSTREAM if (SHARED_UPSTREAM / "train_v2.py").is_file() else None


UPSTREAM = upstream_root()
NO_UPSTREAM = ("no arcface_torch recipe: set ARCFACE_TORCH_DIR to a pristine insightface/recognition/arcface_torch "
               f"checkout (pinned commit {UPSTREAM_SHORT}), or lay the shared export at {SHARED_UPSTREAM}")
needs_upstream = pytest.mark.skipif(UPSTREAM is None, reason=NO_UPSTREAM)


def faces_dir() -> Path:
    """The Extended Yale B identity folders (OTFACE_FACES_DIR overrides)."""
    env = os.environ.get("OTFACE_FACES_DIR")
    if env:
        return Path(env)
    shared = os.environ.get("OTFACE_SHARED_DATA")
    return Path(shared) / "extyaleb" if shared else SHARED / "data" / "extyaleb"


def copy_upstream(dst: Path) -> Path:
    """A writable copy of the pristine recipe (copytree keeps the read-only bits of the source)."""
    if UPSTREAM is None:
        pytest.skip(NO_UPSTREAM)
    from otface_plugin.arcface_torch.installer import copy_checkout

    return copy_checkout(UPSTREAM, dst)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstream_checkout(tmp_path) -> Path:
    """A fresh writable copy of the pristine recipe under tmp_path."""
    return copy_upstream(tmp_path / "arcface_torch")


@pytest.fixture(scope="session")
def faces() -> Path:
    d = faces_dir()
    if not d.is_dir():
        pytest.skip(f"face images not found at {d} (set OTFACE_FACES_DIR)")
    return d


@pytest.fixture(scope="session")
def train_python() -> str:
    """An interpreter with the recipe's own dependencies (OTFACE_TRAIN_PYTHON, else this one)."""
    py = os.environ.get("OTFACE_TRAIN_PYTHON", sys.executable)
    r = subprocess.run([py, "-W", "ignore", "-c", RECIPE_DEPS], capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
        pytest.skip(f"{py} lacks the recipe's dependencies (set OTFACE_TRAIN_PYTHON; "
                    f"`bash .ci/recipe_env.sh` builds one): {last}")
    return py


def cuda_available() -> bool:
    try:  # the mxnet-compat tests share this conftest in an env without torch
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# The same test on every device: the "cuda" case carries the `cuda` marker (`pytest -m cuda` runs
# only those) and skips where no GPU is present.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not cuda_available(), reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    import torch

    return torch.device(request.param)


@pytest.fixture(scope="session")
def lfw() -> Path:
    """The LFW folder (images/, pairs.txt, people.txt): OTFACE_SHARED_DATA/lfw or ../shared/data/lfw."""
    shared = os.environ.get("OTFACE_SHARED_DATA")
    d = Path(shared) / "lfw" if shared else SHARED / "data" / "lfw"
    if not (d / "pairs.txt").is_file():
        pytest.skip(f"LFW not found at {d} (its images/ and pairs.txt; set OTFACE_SHARED_DATA)")
    return d
