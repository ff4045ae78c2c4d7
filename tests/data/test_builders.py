"""build-rec / build-bin / inspect / split on synthetic identity folders.

The .bin is read back with an independent reader written here (pickle + Pillow, following the
recipe's eval/verification.py:load_bin), never with the writer's helpers.
"""
import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from otface_plugin.data.cli import main as cli


def make_faces(root, n_id=8, n_img=5, size=(20, 24), gray=True):
    """Identity c, image j: a flat image whose value encodes (c, j), so decoded pixels identify
    the source exactly (PNG) or approximately (JPEG)."""
    for c in range(n_id):
        d = root / f"person_{c:02d}"
        d.mkdir(parents=True)
        for j in range(n_img):
            v = 10 + 6 * (c * n_img + j) % 240
            arr = np.full((size[1], size[0]), v, np.uint8)
            arr[0, 0] = c  # exact tags survive PNG
            arr[0, 1] = j
            mode = "L" if gray else "RGB"
            img = Image.fromarray(arr) if gray else Image.fromarray(np.stack([arr] * 3, -1))
            img.convert(mode).save(d / f"img_{j}.png")
    return root


# ------------------------------------------------------------------ independent readers

MAGIC = 0xCED7230A


def read_rec_raw(rec, idx):
    """{key: (flag, labels, payload)} parsed straight from the bytes (single-part records)."""
    data = open(rec, "rb").read()
    out = {}
    for line in open(idx).read().splitlines():
        k, off = map(int, line.split("\t"))
        magic, lrec = struct.unpack_from("<II", data, off)
        assert magic == MAGIC and lrec >> 29 == 0
        body = data[off + 8: off + 8 + (lrec & (2 ** 29 - 1))]
        flag, label, _id, _id2 = struct.unpack_from("<IfQQ", body)
        labels = list(struct.unpack_from(f"<{flag}f", body, 24)) if flag else [label]
        out[k] = (flag, labels, body[24 + 4 * flag:])
    return out


def load_bin_like_recipe(path, image_size=(112, 112)):
    """eval/verification.py:load_bin semantics with Pillow instead of mx.image.imdecode."""
    try:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f, encoding="bytes")
    data = np.empty((len(issame_list) * 2, 3, image_size[0], image_size[1]), np.uint8)
    for i in range(len(issame_list) * 2):
        img = np.asarray(Image.open(io.BytesIO(bins[i])).convert("RGB"))
        data[i] = img.transpose(2, 0, 1)
    return bins, issame_list, data


# ------------------------------------------------------------------ build-rec


def test_build_rec_layout_prefix_mode(tmp_path):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=3)
    assert cli(["build-rec", str(root), str(tmp_path / "out" / "faces"), "--no-progress",
                "--format", ".png", "--resize", "0"]) == 0
    recs = read_rec_raw(tmp_path / "out" / "faces.rec", tmp_path / "out" / "faces.idx")
    assert sorted(recs) == list(range(1 + 12 + 4))
    assert recs[0][:2] == (2, [13.0, 17.0])  # [first identity record, end]
    for c in range(4):
        flag, (a, b), payload = recs[13 + c]
        assert flag == 2 and payload == b"" and (a, b) == (1 + 3 * c, 4 + 3 * c)
        for k in range(int(a), int(b)):
            flag, (label,), png = recs[k]
            img = np.asarray(Image.open(io.BytesIO(png)))
            assert flag == 0 and label == c
            assert img.shape == (24, 20, 3)  # grayscale stored as 3-channel RGB
            assert (img[0, 0] == c).all() and (img[0, 1] == k - a).all()
    assert not (tmp_path / "out" / "property").exists()


def test_build_rec_directory_mode_for_the_recipe(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=3, n_img=4)
    out = tmp_path / "ds"
    out.mkdir()
    assert cli(["build-rec", str(root), str(out), "--no-progress", "--workers", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]
    assert (out / "property").read_text() == "3,112,112\n"
    recs = read_rec_raw(out / "train.rec", out / "train.idx")
    img = Image.open(io.BytesIO(recs[1][2]))
    assert img.format == "JPEG" and img.size == (112, 112) and img.mode == "RGB"
    capsys.readouterr()
    assert cli(["inspect", str(out), "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)
    assert (s["identities"], s["images"], s["image_size"]) == (3, 12, [112, 112, 3])
    assert s["header"]["label"] == [13.0, 16.0] and s["label_range"] == [0, 2]


def test_build_rec_identity_subset_and_split(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=10, n_img=2)
    tr, ho = tmp_path / "train.txt", tmp_path / "hold.txt"
    assert cli(["split", str(root), "--holdout-fraction", "0.3", "--seed", "4",
                "--train-list", str(tr), "--holdout-list", str(ho)]) == 0
    train, hold = tr.read_text().split(), ho.read_text().split()
    assert len(hold) == 3 and len(train) == 7 and not set(train) & set(hold)
    assert sorted(train + hold) == sorted(p.name for p in root.iterdir())
    assert cli(["build-rec", str(root), str(tmp_path / "t"), "--no-progress",
                "--identities-from", str(ho), "--format", ".png", "--resize", "0"]) == 0
    recs = read_rec_raw(tmp_path / "t.rec", tmp_path / "t.idx")
    tags = sorted({int(np.asarray(Image.open(io.BytesIO(recs[k][2])))[0, 0, 0])
                   for k in range(1, 7)})
    assert tags == sorted(int(n.split("_")[1]) for n in hold)
    assert cli(["build-rec", str(root), str(tmp_path / "u"), "--no-progress",
                "--identities-from", str(tmp_path / "nope.txt")]) == 2


# ------------------------------------------------------------------ build-bin


def test_build_bin_loads_like_the_recipe(tmp_path):
    root = make_faces(tmp_path / "faces", n_id=8, n_img=5)
    out = tmp_path / "val.bin"
    assert cli(["build-bin", str(root), str(out), "--pairs", "40", "--folds", "4",
                "--no-progress"]) == 0
    bins, issame, data = load_bin_like_recipe(out)
    assert isinstance(bins, list) and isinstance(issame, list)
    assert len(issame) == 40 and len(bins) == 80
    assert all(isinstance(b, bytes) and b[:3] == b"\xff\xd8\xff" for b in bins)  # JPEG
    assert all(type(s) is bool for s in issame) and sum(issame) == 20
    assert data.shape == (80, 3, 112, 112)


def test_build_bin_pairs_folds_are_identity_disjoint(tmp_path):
    root = make_faces(tmp_path / "faces", n_id=12, n_img=4)
    out = tmp_path / "val.bin"
    assert cli(["build-bin", str(root), str(out), "--pairs", "60", "--folds", "3",
                "--format", ".png", "--resize", "0", "--seed", "3", "--no-progress"]) == 0
    bins, issame, _ = load_bin_like_recipe(out, image_size=(24, 20))
    tags = [tuple(np.asarray(Image.open(io.BytesIO(b)))[0, :2, 0]) for b in bins]
    pairs = [(tags[2 * i], tags[2 * i + 1], issame[i]) for i in range(60)]
    fold_ids = []
    for f in range(3):  # KFold(shuffle=False) blocks of the recipe
        block = pairs[20 * f: 20 * (f + 1)]
        assert sum(s for _, _, s in block) == 10  # balanced per fold
        for a, b, s in block:
            assert (a[0] == b[0]) == s and a != b
        assert len({tuple(sorted((a, b))) for a, b, _ in block}) == 20  # distinct pairs
        fold_ids.append({t[0] for a, b, _ in block for t in (a, b)})
    for i in range(3):
        for j in range(i + 1, 3):
            assert not fold_ids[i] & fold_ids[j]
    again = tmp_path / "again.bin"
    cli(["build-bin", str(root), str(again), "--pairs", "60", "--folds", "3", "--format",
         ".png", "--resize", "0", "--seed", "3", "--no-progress"])
    assert again.read_bytes() == out.read_bytes()  # deterministic for a seed


def test_build_bin_argument_errors(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=2)
    assert cli(["build-bin", str(root), str(tmp_path / "a.bin"), "--pairs", "30",
                "--folds", "2"]) == 2
    assert "multiple of 2 x folds" in capsys.readouterr().err
    assert cli(["build-bin", str(root), str(tmp_path / "a.bin"), "--pairs", "40",
                "--folds", "10"]) == 2
    assert "at least 20 identities" in capsys.readouterr().err
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("mode,expect", [("crop", (112, 112)), ("stretch", (112, 112))])
def test_resize_modes(tmp_path, mode, expect):
    from otface_plugin.data.folders import load_rgb

    p = tmp_path / "x.png"
    arr = np.zeros((192, 168), np.uint8)
    arr[:, :84] = 255  # left half white
    Image.fromarray(arr).save(p)
    img = load_rgb(p, 112, mode)
    assert img.size == expect and img.mode == "RGB"
    left = np.asarray(img)[:, :50].mean()
    assert left > 200


# ------------------------------------------------------------------ build-bin --pairs-file


def make_named_faces(root, people):
    """LFW layout: root/Name/Name_NNNN.png, 1-based; pixel [0, 0] = person index, [0, 1] = image."""
    for c, (name, n) in enumerate(people):
        d = root / name
        d.mkdir(parents=True)
        for j in range(1, n + 1):
            arr = np.full((24, 20), 40 + 10 * c, np.uint8)
            arr[0, 0], arr[0, 1] = c, j
            Image.fromarray(arr).save(d / f"{name}_{j:04d}.png")
    return root


PEOPLE = [("Ann_A", 3), ("Bob_B", 2), ("Cy_C", 1), ("Di_D", 4), ("Ed_E", 2), ("Flo_F", 1)]
# 2 folds x (2 same + 2 different), tab-separated like LFW's file
PAIRS_TXT = ("2\t2\n"
             "Ann_A\t1\t3\nBob_B\t1\t2\nAnn_A\t2\tCy_C\t1\nBob_B\t2\tAnn_A\t1\n"
             "Di_D\t4\t1\nEd_E\t1\t2\nDi_D\t3\tFlo_F\t1\nEd_E\t2\tFlo_F\t1\n")


def _tags(bins):
    return [tuple(int(v) for v in np.asarray(Image.open(io.BytesIO(b)))[0, :2, 0]) for b in bins]


def test_build_bin_pairs_file_keeps_file_order_and_selects_folds(tmp_path, capsys):
    root = make_named_faces(tmp_path / "images", PEOPLE)
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    out = tmp_path / "lfw.bin"
    assert cli(["build-bin", str(root), str(out), "--pairs-file", str(tmp_path / "pairs.txt"),
                "--format", ".png", "--resize", "0", "--no-progress"]) == 0
    assert "8 pairs (4 same)" in capsys.readouterr().out
    bins, issame, _ = load_bin_like_recipe(out, image_size=(24, 20))
    idx = {name: c for c, (name, _) in enumerate(PEOPLE)}
    want = [(("Ann_A", 1), ("Ann_A", 3)), (("Bob_B", 1), ("Bob_B", 2)), (("Ann_A", 2), ("Cy_C", 1)),
            (("Bob_B", 2), ("Ann_A", 1)), (("Di_D", 4), ("Di_D", 1)), (("Ed_E", 1), ("Ed_E", 2)),
            (("Di_D", 3), ("Flo_F", 1)), (("Ed_E", 2), ("Flo_F", 1))]
    assert _tags(bins) == [(idx[n], j) for pair in want for n, j in pair]
    assert issame == [True, True, False, False, True, True, False, False]

    # --folds 2: only the second fold, same bytes as the tail of the full file
    two = tmp_path / "fold2.bin"
    assert cli(["build-bin", str(root), str(two), "--pairs-file", str(tmp_path / "pairs.txt"),
                "--folds", "2", "--format", ".png", "--resize", "0", "--no-progress"]) == 0
    bins2, issame2, _ = load_bin_like_recipe(two, image_size=(24, 20))
    assert bins2 == bins[8:] and issame2 == issame[4:]


@pytest.mark.parametrize("text,extra,message", [
    (PAIRS_TXT.replace("Cy_C\t1", "Cy_C\t2"), [], "line 4: image 2 of 'Cy_C' not found"),
    (PAIRS_TXT.replace("Bob_B\t1\t2", "Bob_B\t1\tX\t2"), [], "line 3: fold 1 expects 'name i j'"),
    (PAIRS_TXT.replace("Ed_E\t1\t2", "Ed_E\tone\t2"), [], "line 7: image number 'one' is not an integer"),
    ("3\t2\n" + PAIRS_TXT.split("\n", 1)[1], [], "header says 3 fold(s)"),
    (PAIRS_TXT, ["--folds", "3"], "folds are numbered 1..2"),
    (PAIRS_TXT, ["--pairs", "4"], "--pairs does not apply with --pairs-file"),
])
def test_build_bin_pairs_file_errors_name_the_line(tmp_path, capsys, text, extra, message):
    root = make_named_faces(tmp_path / "images", PEOPLE)
    (tmp_path / "pairs.txt").write_text(text)
    out = tmp_path / "lfw.bin"
    assert cli(["build-bin", str(root), str(out), "--pairs-file", str(tmp_path / "pairs.txt"),
                "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_build_bin_without_pairs_or_pairs_file_is_an_error(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=2)
    assert cli(["build-bin", str(root), str(tmp_path / "a.bin")]) == 2
    assert "needs --pairs N (or --pairs-file" in capsys.readouterr().err
    assert cli(["build-bin", str(root), str(tmp_path / "a.bin"), "--pairs", "8", "--folds", "1-2"]) == 2
    assert "needs --pairs-file" in capsys.readouterr().err


EVAL_WITH_RECIPE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from eval import verification  # the recipe's own loader and evaluation (imports mxnet)
data_list, issame = verification.load_bin(sys.argv[2], (112, 112))
# A trivial "backbone": 8x8 average-pooled pixels. Pixels carry some identity signal, so the
# accuracy is above chance only if every pair's label matches its two images.
net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten())
acc1, std1, acc2, std2, xnorm, emb = verification.test((data_list, issame), net, 1000, 10)
import json
print("RESULT " + json.dumps({"pairs": len(issame), "same": int(sum(issame)), "shape": list(data_list[0].shape),
                             "flip_shape": list(data_list[1].shape), "accuracy": float(acc2), "std": float(std2)}))
"""


@pytest.mark.slow
@pytest.mark.upstream
def test_lfw_bin_from_pairs_txt_is_read_and_evaluated_by_the_recipe(lfw, tmp_path, upstream_checkout,
                                                                    train_python):
    import json
    import subprocess

    from otface_plugin.arcface_torch import installer

    # The recipe as a plugin user runs it: its verification.py needs the numpy/scipy compat patches.
    installer.install(upstream_checkout, configs=False)
    out = tmp_path / "lfw.bin"
    assert cli(["build-bin", str(lfw / "images"), str(out), "--pairs-file", str(lfw / "pairs.txt"),
                "--no-progress"]) == 0
    bins, issame, data = load_bin_like_recipe(out)
    assert len(issame) == 6000 and sum(issame) == 3000 and data.shape == (12000, 3, 112, 112)
    for k in range(10):  # each fold: 300 same then 300 different, in the file's order
        assert issame[600 * k: 600 * (k + 1)] == [True] * 300 + [False] * 300
    script = tmp_path / "eval_bin.py"
    script.write_text(EVAL_WITH_RECIPE)
    r = subprocess.run([train_python, "-W", "ignore", str(script), str(upstream_checkout), str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["pairs"] == 6000 and res["same"] == 3000
    assert res["shape"] == res["flip_shape"] == [12000, 3, 112, 112]
    assert 0.55 < res["accuracy"] < 1.0  # labels aligned with images; chance would be 0.5


@pytest.mark.parametrize("text,message", [
    (PAIRS_TXT.replace("Ann_A\t2\tCy_C\t1", "Ann_A\t2\tAnn_A\t1"),
     "line 4: a different-people line of fold 1 names 'Ann_A' twice"),
    (PAIRS_TXT.replace("Ed_E\t1\t2", "Ed_E\t2\t2"),
     "line 7: a same-person line of fold 2 pairs image 2 of 'Ed_E' with itself"),
])
def test_build_bin_pairs_file_pair_of_one_thing_is_an_error(tmp_path, capsys, text, message):
    root = make_named_faces(tmp_path / "images", PEOPLE)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text)
    out = tmp_path / "lfw.bin"
    assert cli(["build-bin", str(root), str(out), "--pairs-file", str(pairs),
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{pairs} {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
