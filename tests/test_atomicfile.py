"""otface_plugin.atomicfile: the one temp-file-and-rename write the package builds on."""
import os

import pytest

from otface_plugin.atomicfile import atomic_file, atomic_write


def test_new_file_gets_the_umask_mode_and_mode_is_kept_when_given(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.txt", "héllo")
        atomic_write(tmp_path / "kept.bin", b"\x00\x01", mode=0o100751)
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").read_bytes() == "héllo".encode("utf-8")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "kept.bin").stat().st_mode & 0o777 == 0o751
    assert sorted(os.listdir(tmp_path)) == ["kept.bin", "new.txt"]  # no temp file left


def test_failure_inside_the_block_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, suffix=".otface-tmp") as f:
            f.write(b"half")
            assert [p for p in os.listdir(tmp_path) if p.endswith(".otface-tmp")]
            raise RuntimeError("killed half-way")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_failed_rename_removes_the_temp_file(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "dir", b"x")  # a directory cannot be replaced by a file
    assert os.listdir(tmp_path) == ["dir"] and not os.listdir(tmp_path / "dir")
