"""End to end on real faces: identity-disjoint split of Extended Yale B -> train .rec + val .bin,
then IdentityIndex, PKSampler and the mxnet-free dataset on the result.

Data: <repo>/../shared/data/extyaleb (override with OTFACE_SHARED_DATA=<dir containing
data/extyaleb or the extyaleb folder itself>). Skipped with a reason when absent.
"""
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otface_plugin.data import IdentityIndex, PKSampler
from otface_plugin.data.cli import main as cli

from conftest import SHARED


def _extyaleb() -> Path:
    env = os.environ.get("OTFACE_SHARED_DATA")
    candidates = ([Path(env) / "data" / "extyaleb", Path(env) / "extyaleb", Path(env)]
                  if env else [SHARED / "data" / "extyaleb"])
    for c in candidates:
        if (c / "yaleB01").is_dir():
            return c
    pytest.skip(f"Extended Yale B not found at {', '.join(map(str, candidates))} "
                f"(set OTFACE_SHARED_DATA)")


@pytest.mark.slow
def test_extyaleb_rec_and_bin_from_identity_disjoint_split(tmp_path, capsys):
    data = _extyaleb()
    tr, ho = tmp_path / "train_ids.txt", tmp_path / "holdout_ids.txt"
    assert cli(["split", str(data), "--holdout-fraction", "0.25", "--seed", "0",
                "--train-list", str(tr), "--holdout-list", str(ho)]) == 0
    train, hold = tr.read_text().split(), ho.read_text().split()
    assert len(train) + len(hold) == 38 and not set(train) & set(hold)

    out = tmp_path / "yaleb_112/"
    assert cli(["build-rec", str(data), str(out) + "/", "--identities-from", str(tr),
                "--workers", "2", "--no-progress"]) == 0
    assert cli(["build-bin", str(data), str(out / "yaleb.bin"), "--pairs", "400", "--folds",
                "2", "--identities-from", str(ho), "--workers", "2", "--no-progress"]) == 0
    n_train = sum(len(list((data / n).glob("*.pgm"))) for n in train)
    assert (out / "property").read_text() == f"{len(train)},112,112\n"

    capsys.readouterr()
    assert cli(["inspect", str(out), "--verify", "--no-cache"]) == 0
    summary = capsys.readouterr().out
    assert f"images:      {n_train:,}" in summary and "112x112x3" in summary

    index = IdentityIndex.from_rec(out / "train.rec")
    assert index.num_identities == len(train) and index.num_images == n_train

    # the .bin, read the recipe's way (pickle, encoding='bytes' fallback) with Pillow
    with open(out / "yaleb.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert len(issame) == 400 and len(bins) == 800 and sum(issame) == 200
    faces = [np.asarray(Image.open(io.BytesIO(b))) for b in bins[:20]]
    assert all(f.shape == (112, 112, 3) and (f[..., 0] == f[..., 1]).all() for f in faces)

    # P x K batches from the real file through the mxnet-free dataset
    from otface_plugin.data.dataset import RecordFaceDataset

    ds = RecordFaceDataset(str(out))
    assert len(ds) == n_train
    sampler = PKSampler(index, batch_size=16, num_instances=4, num_replicas=2, rank=1, seed=3)
    first = list(sampler)[:16]
    labels = [int(ds[i][1]) for i in first]
    assert all(labels[4 * p:4 * p + 4] == [labels[4 * p]] * 4 for p in range(4))
    x, _ = ds[first[0]]
    assert tuple(x.shape) == (3, 112, 112) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
