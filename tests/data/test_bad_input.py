"""Malformed inputs give clear errors naming the file and the record, and leave no output;
hostile file names and a full disk leave the user's files as they were."""
import errno
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from otface_plugin.data import (IdentityIndex, IRHeader, MXIndexedRecordIO, MXRecordIO,
                                RecordIOError, pack)
from otface_plugin.data.cli import main as cli
from otface_plugin.data.dataset import read_image_record
from otface_plugin.data.errors import DatasetLayoutError, ImageDecodeError
from otface_plugin.data.folders import read_identity_list
from otface_plugin.data.imagecodec import encode_image
from otface_plugin.data.rec_builder import build_rec
from conftest import REPO
from helpers import make_faces, snapshot


def write_rec(tmp_path, payloads, name="t"):
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    for i, p in enumerate(payloads):
        w.write_idx(i, p)
    w.close()
    return rec, idx


def image_record(label, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return pack(IRHeader(0, float(label), 0, 0), encode_image(img, ".png"))


def test_truncated_last_record(tmp_path):
    rec, idx = write_rec(tmp_path, [image_record(i, i) for i in range(4)])
    size = rec.stat().st_size
    with open(rec, "r+b") as f:
        f.truncate(size - 10)
    r = MXIndexedRecordIO(idx, rec, "r")
    assert r.read_idx(2)  # earlier records still readable
    with pytest.raises(RecordIOError) as e:
        r.read_idx(3)
    msg = str(e.value)
    assert str(rec) in msg and "record 3" in msg and "truncated" in msg


def test_truncated_before_a_record_start_is_caught_at_open(tmp_path):
    rec, idx = write_rec(tmp_path, [image_record(i, i) for i in range(4)])
    last = int(idx.read_text().splitlines()[-1].split("\t")[1])
    with open(rec, "r+b") as f:
        f.truncate(last)
    with pytest.raises(RecordIOError) as e:
        MXIndexedRecordIO(idx, rec, "r")
    msg = str(e.value)
    assert str(idx) in msg and "record 3" in msg and "past the end" in msg


def test_truncated_header_in_sequential_read(tmp_path):
    rec, _ = write_rec(tmp_path, [b"abcd", b"efgh"])
    with open(rec, "ab") as f:
        f.write(b"\x0a\x23")  # dangling partial header
    r = MXRecordIO(str(rec), "r")
    assert r.read() == b"abcd" and r.read() == b"efgh"
    with pytest.raises(RecordIOError, match="truncated"):
        r.read()


def test_wrong_magic(tmp_path):
    rec = tmp_path / "junk.rec"
    rec.write_bytes(b"GIF89a" + bytes(100))
    (tmp_path / "junk.idx").write_text("0\t0\n")
    r = MXIndexedRecordIO(tmp_path / "junk.idx", rec, "r")
    with pytest.raises(RecordIOError) as e:
        r.read_idx(0)
    msg = str(e.value)
    assert str(rec) in msg and "record 0" in msg and "bad magic" in msg
    with pytest.raises(RecordIOError, match="bad magic"):
        MXRecordIO(str(rec), "r").read()


def test_idx_offset_not_at_a_record_start(tmp_path):
    rec, idx = write_rec(tmp_path, [b"a" * 40, b"b" * 40])
    idx.write_text("0\t0\n1\t12\n")
    r = MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(RecordIOError, match=r"record 1.*bad magic 0x61616161 at byte 12"):
        r.read_idx(1)


def test_idx_pointing_past_end(tmp_path):
    rec, idx = write_rec(tmp_path, [b"abcd"] * 3)
    idx.write_text("0\t0\n1\t12\n2\t99999\n")
    with pytest.raises(RecordIOError) as e:
        MXIndexedRecordIO(idx, rec, "r")
    msg = str(e.value)
    assert str(idx) in msg and "record 2" in msg and "99999" in msg and "line 3" in msg


def test_idx_malformed_line(tmp_path):
    rec, idx = write_rec(tmp_path, [b"abcd"] * 2)
    idx.write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"t\.idx: line 2"):
        MXIndexedRecordIO(idx, rec, "r")


def test_record_not_an_image(tmp_path):
    rec, idx = write_rec(tmp_path, [image_record(0), pack(IRHeader(0, 1.0, 0, 0), b"hello")])
    r = MXIndexedRecordIO(idx, rec, "r")
    assert read_image_record(r, 0)[1].shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError) as e:
        read_image_record(r, 1)
    assert str(rec) in str(e.value) and "record 1 is not an image" in str(e.value)


def test_record_not_an_image_via_cli_inspect(tmp_path, capsys):
    header = pack(IRHeader(0, [3.0, 4.0], 0, 0), b"")
    ident = pack(IRHeader(0, [1.0, 3.0], 0, 0), b"")
    rec, _ = write_rec(tmp_path, [header, image_record(0),
                                  pack(IRHeader(0, 0.0, 2, 0), b"\xff\xd8 not a jpeg"), ident],
                       name="train")
    assert cli(["inspect", str(tmp_path), "--verify", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert str(rec) in err and "record 2 is not an image" in err


def test_idx_from_another_file_is_detected_by_the_index(tmp_path):
    rec, idx = write_rec(tmp_path, [image_record(i % 2, i) for i in range(6)])
    other = tmp_path / "other.idx"
    other.write_text("".join(f"{i}\t{i * 8 + 4}\n" for i in range(6)))
    with pytest.raises(RecordIOError, match="bad magic"):
        IdentityIndex.from_rec(rec, other, cache=False)


def _faces(tmp_path):
    return make_faces(tmp_path / "faces", 3, 3, 16, value=lambda c, j: 40 * c + j)


def test_empty_identity_folder(tmp_path, capsys):
    root = _faces(tmp_path)
    (root / "id_empty").mkdir()
    (root / "id_empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    with pytest.raises(DatasetLayoutError, match="id_empty: identity folder has no image"):
        build_rec(root, out)
    assert cli(["build-rec", str(root), str(out), "--no-progress"]) == 2
    assert "id_empty" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))
    r = build_rec(root, out, skip_bad=True)  # skipping is opt-in
    assert r.num_identities == 3


def test_bad_image_aborts_with_nothing_written(tmp_path, capsys):
    root = _faces(tmp_path)
    bad = root / "id1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out_dir = tmp_path / "ds"
    out_dir.mkdir()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert cli(["build-rec", str(root), str(out_dir), "--no-progress", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad" in err
    assert os.listdir(out_dir) == []  # no partial train.rec/.idx, no temp files
    assert cli(["build-rec", str(root), str(out_dir), "--no-progress", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}" in captured.err and "9 images, 1 skipped" in captured.out
    assert sorted(os.listdir(out_dir)) == ["property", "train.idx", "train.rec"]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # inputs intact


def test_existing_outputs_need_force(tmp_path, capsys):
    root = _faces(tmp_path)
    assert cli(["build-rec", str(root), str(tmp_path / "x"), "--no-progress"]) == 0
    first = (tmp_path / "x.rec").read_bytes()
    assert cli(["build-rec", str(root), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(["build-rec", str(root), str(tmp_path / "x"), "--no-progress", "--force"]) == 0
    assert (tmp_path / "x.rec").read_bytes() == first  # deterministic rebuild


# ------------------------------------------------------------------ hostile names

# a leading dash (an option to a careless parser), a newline (a second line in any message),
# bytes that are not UTF-8 (surrogate escapes in Python, a strict UTF-8 stdout refuses them)
# and an option's spelling
HOSTILE = ["-dash", "new\nline", os.fsdecode(b"bytes\xff\xfe"), "--force"]


def hostile_faces(root, bad=None):
    """Identity folders and image files named HOSTILE; ``bad``: one more, undecodable, image
    file of that name in the first folder."""
    for c, ident in enumerate(HOSTILE):
        (root / ident).mkdir(parents=True)
        for j, name in enumerate(HOSTILE):
            (root / ident / f"{name}.png").write_bytes(
                encode_image(np.full((8, 8), 40 * c + j, np.uint8), ".png"))
    if bad:
        (root / HOSTILE[0] / bad).write_bytes(b"\x89PNG\r\n not really")
    return root


def test_hostile_names_in_and_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hostile_faces(tmp_path / "-faces")
    before = snapshot(tmp_path / "-faces")
    train, hold = "-train\n" + os.fsdecode(b"\xff.txt"), "--hold.txt"
    assert cli(["split", "--holdout-fraction", "0.5", f"--train-list={train}",
                f"--holdout-list={hold}", "--", "-faces"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "\\udcff" in out and "-train\\n" in out, out
    held = read_identity_list(hold)
    assert sorted(read_identity_list(train) + held) == sorted(HOSTILE)
    ds = "-ds\n" + os.fsdecode(b"\xfe") + "/"
    assert cli(["build-rec", "--no-progress", "--resize", "0", f"--identities-from={train}",
                "--", "-faces", ds]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    index = IdentityIndex.from_rec(os.path.join(ds, "train.rec"), cache=False)
    assert index.num_identities == 2 and index.num_images == 8
    assert cli(["build-bin", "--no-progress", "--resize", "0", f"--identities-from={hold}",
                "--pairs", "2", "--folds", "1", "--", "-faces", ds + "--force.bin"]) == 0
    assert os.path.isfile(os.path.join(ds, "--force.bin"))
    assert snapshot(tmp_path / "-faces") == before


def test_hostile_name_of_a_bad_image_is_one_line(tmp_path, capsys):
    root = hostile_faces(tmp_path / "faces", bad="broken\nimage.png")
    out = tmp_path / "ds"
    out.mkdir()
    assert cli(["build-rec", str(root), str(out) + "/", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "-dash/broken\\nimage.png" in err and "--skip-bad" in err
    assert os.listdir(out) == []


def test_hostile_output_names_are_not_overwritten_without_force(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=2)
    victim = tmp_path / ("-t\n" + os.fsdecode(b"\xff"))
    victim.write_bytes(b"someone's file\n")
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    assert cli(["split", str(root), "--train-list", str(victim), "--holdout-list",
                str(tmp_path / "h.txt")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "-t\\n\\udcff" in err and "--force" in err, err
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "h.txt").exists()


def test_report_of_a_non_utf8_name_on_a_strict_stdout(tmp_path):
    """A UTF-8 locale's stdout refuses undecodable bytes: printing the report used to fail
    after the lists were written, so the run said "error" (exit 2) about a success."""
    root = make_faces(tmp_path / "faces", n_id=4, n_img=1)
    hold = os.fsencode(str(tmp_path)) + b"/h\xff.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, "-m", "otface_plugin.data.cli", "split", str(root),
                        "--train-list", str(tmp_path / "t.txt"), b"--holdout-list=" + hold],
                       env=env, capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert b"h\\udcff.txt" in r.stdout and os.path.exists(hold)


# ------------------------------------------------------------------ full disk


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: a real file system that fills up (needs root with mount rights)."""
    d = tmp_path / "fs"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def fill(d):
    """Fill the file system of ``d`` up to the last byte."""
    with open(d / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("cmd", ["build-rec", "build-bin", "split"])
@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "first"])
def test_full_disk(tmp_path, small_fs, capsys, cmd, previous):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=3)
    args = {"build-rec": ["build-rec", str(root), f"{small_fs}/", "--no-progress"],
            "build-bin": ["build-bin", str(root), str(small_fs / "v.bin"), "--pairs", "4",
                          "--folds", "2", "--no-progress"],
            "split": ["split", str(root), "--train-list", str(small_fs / "t.txt"),
                      "--holdout-list", str(small_fs / "h.txt")]}[cmd]
    if previous:
        assert cli(args) == 0
    fill(small_fs)
    before, inputs = snapshot(small_fs), snapshot(root)
    capsys.readouterr()
    assert cli(args + ["--force"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"otface-data {cmd}: error: {small_fs}/") and \
        "No space left on device (no output was changed)" in err, err
    assert snapshot(small_fs) == before and snapshot(root) == inputs  # no temp file either
