"""The patched recipe reads its data with or without mxnet (OTFACE_RECORDIO, mxnet_compat.py).

In the training interpreter (OTFACE_TRAIN_PYTHON, else this one) the patched ``dataset.py`` and
``eval/verification.py`` are imported once per backend in a subprocess; ``MXFaceDataset`` and
``load_bin`` must give the same samples, labels, order and pixels through the plugin's reader as
through mxnet 1.9.1 (where that interpreter has mxnet: the recipe env), and must work without it
(every env: the plugin's reader is what a Python 3.12 / numpy 2 stack gets).
"""
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import copy_upstream, faces_dir, needs_upstream, otface_data, pythonpath

from otface_plugin.arcface_torch import installer

FACES = faces_dir()
pytestmark = [
    pytest.mark.upstream,
    needs_upstream,
    pytest.mark.skipif(not FACES.is_dir(), reason=f"face images not found at {FACES} (set OTFACE_FACES_DIR)"),
]

# Runs inside the patched checkout: every sample of MXFaceDataset (flip draws seeded per index, so
# both backends draw the same flips) and both flips of load_bin, saved for the test to compare.
DUMP = r"""
import sys, json, numpy as np, torch
sys.path.insert(0, "eval")
import dataset, verification
from otface_plugin.arcface_torch import mxnet_compat
rec_dir, bin_path, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ds = dataset.MXFaceDataset(root_dir=rec_dir, local_rank=0)
samples, labels = [], []
for i in range(len(ds)):
    torch.manual_seed(i)
    x, y = ds[i]
    samples.append(x.numpy()); labels.append(int(y))
data, issame = verification.load_bin(bin_path, (size, size))
np.savez(out, samples=np.stack(samples), labels=np.array(labels), imgidx=np.asarray(ds.imgidx),
         header0=np.array(getattr(ds, "header0", (-1, -1))), bin0=data[0].numpy(), bin1=data[1].numpy(),
         issame=np.array(issame))
print(json.dumps({"backend": mxnet_compat.backend, "mx": dataset.mx.__name__}))
"""



@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """A patched checkout, a 3-identity .rec and two .bin files (112 px, and 128 px: load_bin resizes)."""
    d = tmp_path_factory.mktemp("recordio")
    root = copy_upstream(d / "arcface_torch")
    installer.install(root)
    ids = sorted(p.name for p in FACES.iterdir() if p.is_dir())
    (d / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (d / "test.txt").write_text("\n".join(ids[3:7]) + "\n")
    otface_data("build-rec", FACES, f"{d / 'rec'}/", "--identities-from", d / "train.txt", "--resize", 112,
                "--no-progress")
    for size in (112, 128):
        otface_data("build-bin", FACES, d / f"test{size}.bin", "--identities-from", d / "test.txt", "--pairs", 40,
                    "--folds", 2, "--resize", size, "--no-progress")
    return {"root": root, "rec": d / "rec", "bins": {s: d / f"test{s}.bin" for s in (112, 128)}, "dir": d}


def dump(py, patched, backend, size, tmp_path):
    out = tmp_path / f"{backend}-{size}.npz"
    env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONWARNINGS": "ignore", "OTFACE_RECORDIO": backend}
    r = subprocess.run([py, "-c", DUMP, str(patched["rec"]), str(patched["bins"][size]), "112", str(out)],
                       cwd=patched["root"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"OTFACE_RECORDIO={backend}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    info = json.loads(r.stdout.strip().splitlines()[-1])
    return info, dict(np.load(out))


def has_mxnet(py) -> bool:
    r = subprocess.run([py, "-W", "ignore", "-c", "from otface_plugin.arcface_torch.mxnet_compat import load_mx; "
                        "load_mx('mxnet')"], env={**os.environ, "PYTHONPATH": pythonpath()}, capture_output=True)
    return r.returncode == 0


def test_recipe_reads_rec_and_bin_without_mxnet(patched, train_python, tmp_path):
    info, got = dump(train_python, patched, "plugin", 112, tmp_path)
    assert info["backend"] == "plugin" and "mxnet_compat" in info["mx"]
    # the .rec's own identity header: record 0 names the identity records, imgidx the image records
    n = len(got["labels"])
    assert got["header0"][0] == n + 1 and list(got["imgidx"]) == list(range(1, n + 1))
    assert sorted(set(got["labels"])) == [0, 1, 2]
    assert got["samples"].shape == (n, 3, 112, 112) and got["samples"].min() >= -1 and got["samples"].max() <= 1
    assert got["bin0"].shape == (80, 3, 112, 112) and len(got["issame"]) == 40
    np.testing.assert_array_equal(got["bin1"], got["bin0"][:, :, :, ::-1])  # the flipped copy


def test_plugin_reader_equals_mxnet_in_the_recipe(patched, train_python, tmp_path):
    if not has_mxnet(train_python):
        pytest.skip(f"{train_python} has no working mxnet (the recipe env of .ci/recipe_env.sh has mxnet 1.9.1)")
    for size in (112, 128):
        mx_info, ref = dump(train_python, patched, "mxnet", size, tmp_path)
        pl_info, got = dump(train_python, patched, "plugin", size, tmp_path)
        assert (mx_info["backend"], pl_info["backend"]) == ("mxnet", "plugin")
        assert mx_info["mx"].startswith("mxnet")
        for key in ("labels", "imgidx", "header0", "issame", "samples"):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{key} (.bin {size} px)")
        if size == 112:  # no resize: the decoded pixels are mxnet's exactly
            np.testing.assert_array_equal(got["bin0"], ref["bin0"])
            np.testing.assert_array_equal(got["bin1"], ref["bin1"])
        else:  # resize_short: OpenCV bicubic on both sides; builds of OpenCV may round differently
            diff = np.abs(got["bin0"] - ref["bin0"]).max()
            assert diff <= 2, f"resized .bin pixels differ by {diff:.0f} levels"


def test_unknown_backend_is_an_error_naming_the_variable(patched, train_python, tmp_path):
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OTFACE_RECORDIO": "mxnett"}
    r = subprocess.run([train_python, "-c", "import dataset"], cwd=patched["root"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "OTFACE_RECORDIO='mxnett': choose one of auto, mxnet, plugin" in r.stderr
