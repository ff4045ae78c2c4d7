"""What otface-data leaves on disk when things go wrong (issue 9, cases 5 and 7): nested image
folders, `split`'s two lists, temp files of interrupted builds, failed commits, and targets
that cannot be written (one-line errors, previous outputs untouched)."""
import builtins
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from otface_plugin.data.cli import main as cli
from otface_plugin.data.imagecodec import encode_image
from conftest import REPO
from helpers import make_faces, snapshot


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OTFACE_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "otface_plugin.data.cli", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ nested folders (case 7)


def test_nested_images_are_reported_or_included(tmp_path, capsys, caplog):
    root = make_faces(tmp_path / "faces", n_id=3, n_img=2)
    (root / "id1" / "session2").mkdir()
    for j in range(3):
        (root / "id1" / "session2" / f"{j}.png").write_bytes(
            encode_image(np.full((8, 8), 200 + j, np.uint8), ".png"))
    (root / "id1" / ".thumbs").mkdir()  # hidden: never identity data
    (root / "id1" / ".thumbs" / "t.png").write_bytes(encode_image(np.zeros((8, 8), np.uint8),
                                                                  ".png"))
    assert cli(["build-rec", str(root), str(tmp_path / "flat"), "--no-progress"]) == 0
    assert "3 identities, 6 images" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("3 images in sub-folders" in m and str(root / "id1" / "session2" / "0.png") in m
               and "--recursive" in m for m in warned)
    assert cli(["build-rec", str(root), str(tmp_path / "deep"), "--no-progress",
                "--recursive"]) == 0
    assert "3 identities, 9 images" in capsys.readouterr().out


# ------------------------------------------------------------------ split: both or neither


def test_split_writes_both_lists_or_neither(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_id=6, n_img=1)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    tr = tmp_path / "train.txt"
    tr.write_text("previous\n")
    assert cli(["split", str(root), "--holdout-fraction", "0.5", "--train-list", str(tr),
                "--holdout-list", str(tmp_path / "blocker" / "hold.txt"), "--force"]) == 2
    err = capsys.readouterr().err
    assert "blocker" in err and len(err.splitlines()) == 1
    assert tr.read_text() == "previous\n"  # the first list was not written either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "faces", "train.txt"]


# ------------------------------------------------------------------ temp files of dead builds


def test_stale_temp_files_are_removed_on_the_next_run(tmp_path):
    root = make_faces(tmp_path / "faces")
    out = tmp_path / "ds"
    out.mkdir()
    assert cli(["build-rec", str(root), str(out), "--no-progress"]) == 0
    dead = [".train.rec.99999999.0badcafe.partial",  # pid above pid_max: not running
            ".train.idx.99999999.0badcafe.old",
            ".property.a1b2c3d4.partial"]  # an older version's name, which has no pid
    alive = [f".train.rec.{os.getpid()}.12345678.partial",  # a build that is still running
             ".train.rec.notes", "train.rec.bak"]  # not ours
    for name in dead + alive:
        (out / name).write_text("x")
    assert cli(["build-rec", str(root), str(out), "--no-progress", "--force"]) == 0
    assert sorted(os.listdir(out)) == sorted(alive + ["property", "train.idx", "train.rec"])


def test_sigterm_cleans_up_and_keeps_previous_outputs(tmp_path):
    # about a second of building (500 images of 256 px), so that on a loaded machine the signal
    # still lands while the temp files are written, not after the commit
    root = make_faces(tmp_path / "faces", n_id=10, n_img=50, size=256)
    out = tmp_path / "ds"
    out.mkdir()
    prev = make_faces(tmp_path / "prev", n_id=2, n_img=1)
    assert cli(["build-rec", str(prev), str(out), "--no-progress"]) == 0
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OTFACE_NO_PROGRESS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "otface_plugin.data.cli", "build-rec", str(root),
                          str(out), "--force"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.endswith(".partial") for n in os.listdir(out)):
        assert p.poll() is None and time.monotonic() < deadline, "build never started writing"
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert snapshot(out) == before  # no temp files, previous outputs intact


# ------------------------------------------------------------------ unwritable targets (case 5)


def fake_read_only(monkeypatch, d):
    """Make directory ``d`` behave as read-only for this process: creating, opening for write,
    renaming into or out of, and deleting files there raise PermissionError (EACCES).

    Tests run as root, which ignores permission bits, so chmod cannot make a read-only target;
    this patches the os/io calls instead (the same calls the writers use)."""
    d = os.path.realpath(d)

    def inside(path):
        return os.path.dirname(os.path.realpath(os.fspath(path))) == d

    def deny(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    real_os_open, real_open = os.open, builtins.open
    real_replace, real_rename, real_mkdir, real_unlink = os.replace, os.rename, os.mkdir, \
        os.unlink

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            deny(path)
        return real_os_open(path, flags, *a, **k)

    def py_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") \
                and inside(file):
            deny(file)
        return real_open(file, mode, *a, **k)

    def two(real):
        def f(src, dst, *a, **k):
            for p in (src, dst):
                if inside(p):
                    deny(p)
            return real(src, dst, *a, **k)
        return f

    def one(real):
        def f(path, *a, **k):
            if inside(path):
                deny(path)
            return real(path, *a, **k)
        return f

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    monkeypatch.setattr(os, "replace", two(real_replace))
    monkeypatch.setattr(os, "rename", two(real_rename))
    monkeypatch.setattr(os, "mkdir", one(real_mkdir))
    monkeypatch.setattr(os, "unlink", one(real_unlink))


@pytest.mark.parametrize("cmd", ["build-rec", "build-bin", "split"])
def test_read_only_target_is_a_one_line_error(tmp_path, monkeypatch, capsys, cmd):
    root = make_faces(tmp_path / "faces", n_id=4, n_img=3)
    ro = tmp_path / "ro"
    ro.mkdir()
    args = {"build-rec": ["build-rec", str(root), str(ro), "--no-progress"],
            "build-bin": ["build-bin", str(root), str(ro / "v.bin"), "--pairs", "4", "--folds",
                          "2", "--no-progress"],
            "split": ["split", str(root), "--train-list", str(tmp_path / "t.txt"),
                      "--holdout-list", str(ro / "h.txt")]}[cmd]
    assert cli(args) == 0  # previous outputs
    before = snapshot(tmp_path)
    fake_read_only(monkeypatch, ro)
    assert cli(args + ["--force"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"otface-data {cmd}: error: {ro}") and "Permission denied" in err
    assert "(no output was changed)" in err
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permission bits; the fake_read_only test covers this")
def test_read_only_directory_by_mode(tmp_path, capsys):
    root = make_faces(tmp_path / "faces")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (["build-rec", str(root), str(ro), "--no-progress"],
                     ["split", str(root), "--train-list", str(ro / "t"), "--holdout-list",
                      str(ro / "h")]):
            assert cli(args) == 2
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and "Permission denied" in err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("cmd", ["build-rec", "build-bin", "split"])
def test_target_under_a_file_no_traceback(tmp_path, cmd):
    """A real OS error that also happens as root: the target's parent is a regular file."""
    root = make_faces(tmp_path / "faces", n_id=4, n_img=3)
    (tmp_path / "f").write_text("not a folder")
    bad = tmp_path / "f" / "sub"
    args = {"build-rec": ["build-rec", root, f"{bad}/"],
            "build-bin": ["build-bin", root, bad / "v.bin", "--pairs", "4", "--folds", "2"],
            "split": ["split", root, "--train-list", tmp_path / "t.txt", "--holdout-list",
                      bad / "h.txt"]}[cmd]
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and str(tmp_path / "f") in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["f", "faces"]


def test_failed_commit_puts_previous_outputs_back(tmp_path, monkeypatch, capsys):
    """The rename of the new .idx fails after the old outputs were moved aside: the rollback
    restores them byte for byte (a .rec never sits next to another build's .idx)."""
    out = tmp_path / "ds"
    out.mkdir()
    assert cli(["build-rec", str(make_faces(tmp_path / "a", n_id=2)), str(out),
                "--no-progress"]) == 0
    before = snapshot(out)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == str(out / "train.idx") and os.fspath(src).endswith(".partial"):
            raise PermissionError(13, "Permission denied", os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert cli(["build-rec", str(make_faces(tmp_path / "b", n_id=3)), str(out), "--no-progress",
                "--force"]) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert snapshot(out) == before


# ------------------------------------------------------------------ existing outputs and inputs


def sha256(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("which", ["train", "holdout"])
def test_split_into_an_existing_file_needs_force(tmp_path, capsys, which):
    root = make_faces(tmp_path / "faces", n_id=6, n_img=1)
    ds = tmp_path / "ds"
    ds.mkdir()
    victim = ds / "property"  # someone's dataset file, named by mistake
    victim.write_text("40,112,112\n")
    lists = {"train": tmp_path / "train.txt", "holdout": tmp_path / "hold.txt"}
    lists[which] = victim
    args = ["split", str(root), "--holdout-fraction", "0.5", "--train-list", str(lists["train"]),
            "--holdout-list", str(lists["holdout"])]
    before, digest = snapshot(tmp_path), sha256(victim)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(victim) in err and "--force" in err, err
    assert sha256(victim) == digest and snapshot(tmp_path) == before
    assert cli(args + ["--force"]) == 0  # asked for: overwritten
    assert victim.read_text() != "40,112,112\n"


def _inputs_as_outputs(tmp_path):
    """{case: (argv, the output that is an input)} for every writer."""
    root = make_faces(tmp_path / "faces", n_id=4, n_img=3)
    image = root / "id1" / "2.png"
    (tmp_path / "link.png").symlink_to(image)  # the same file under another name
    ids = tmp_path / "x.idx"  # an identity list that build-rec's PREFIX x would overwrite
    ids.write_text("id0\nid1\nid2\nid3\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nid0\t1\t2\nid0\t1\tid1\t1\n")
    (root / "id0" / "id0_0001.png").write_bytes((root / "id0" / "0.png").read_bytes())
    (root / "id0" / "id0_0002.png").write_bytes((root / "id0" / "1.png").read_bytes())
    (root / "id1" / "id1_0001.png").write_bytes((root / "id1" / "0.png").read_bytes())
    bin_opts = ["--pairs", "4", "--folds", "2", "--no-progress"]
    return {
        "split-over-an-image": (["split", root, "--train-list", image, "--holdout-list",
                                 tmp_path / "h.txt"], image),
        "split-over-a-link-to-an-image": (["split", root, "--train-list", tmp_path / "t.txt",
                                           "--holdout-list", tmp_path / "link.png"],
                                          tmp_path / "link.png"),
        "build-bin-over-an-image": (["build-bin", root, image, *bin_opts], image),
        "build-bin-over-its-identity-list": (["build-bin", root, ids, *bin_opts,
                                              "--identities-from", ids], ids),
        "build-bin-over-its-pairs-file": (["build-bin", root, pairs, "--pairs-file", pairs,
                                           "--no-progress"], pairs),
        "build-rec-over-its-identity-list": (["build-rec", root, tmp_path / "x",
                                              "--identities-from", ids, "--no-progress"], ids),
    }


CASES = ["split-over-an-image", "split-over-a-link-to-an-image", "build-bin-over-an-image",
         "build-bin-over-its-identity-list", "build-bin-over-its-pairs-file",
         "build-rec-over-its-identity-list"]


@pytest.mark.parametrize("case", CASES)
def test_an_input_is_never_an_output_even_with_force(tmp_path, capsys, case):
    argv, victim = _inputs_as_outputs(tmp_path)[case]
    before = snapshot(tmp_path)
    assert cli([str(a) for a in argv] + ["--force"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(victim) in err and "input" in err, err
    assert snapshot(tmp_path) == before  # the input, and everything else, as it was
