"""Labels and index coverage (issue 9, case 2): a label outside the class count, a NaN label, an
.idx that is empty, cut short, missing an entry or holding a negative offset are errors that
name the file and the record, in `otface-data inspect` and in RecordFaceDataset."""
import math
import struct

import numpy as np
import pytest

from otface_plugin.data import IdentityIndex, MXIndexedRecordIO, RecordIOError
from otface_plugin.data.cli import main as cli
from otface_plugin.data.dataset import RecordFaceDataset
from otface_plugin.data.imagecodec import encode_image
from otface_plugin.data.rec_builder import build_rec

N_ID, N_IMG = 4, 2  # records 1..8 images, 9..12 identities


@pytest.fixture
def ds(tmp_path):
    faces = tmp_path / "faces"
    for c in range(N_ID):
        (faces / f"id{c}").mkdir(parents=True)
        for j in range(N_IMG):
            img = np.full((8, 8), 30 * c + j, np.uint8)
            (faces / f"id{c}" / f"{j}.png").write_bytes(encode_image(img, ".png"))
    out = tmp_path / "ds"
    out.mkdir()
    build_rec(faces, out, resize=None, img_fmt=".png")
    return out


def offsets(ds):
    return {int(k): int(v) for k, v in
            (ln.split("\t") for ln in (ds / "train.idx").read_text().splitlines())}


def set_label(ds, key, value, field=0, images=range(1, N_ID * N_IMG + 1)):
    """Overwrite a float label in place (record size unchanged, .idx stays valid): the scalar
    IRHeader label (field 0 of an image record, keys ``images``) or the field-th float after
    the header."""
    at = offsets(ds)[key] + 8 + (4 if key in images else 24 + 4 * field)
    with open(ds / "train.rec", "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<f", value))


def inspect(ds, capsys, *flags):
    capsys.readouterr()
    rc = cli(["inspect", str(ds), "--no-cache", *flags])
    err = capsys.readouterr().err
    assert rc != 0 or not err, err
    return rc, err


def test_clean_file_passes(ds, capsys):
    rc, _ = inspect(ds, capsys, "--verify")
    assert rc == 0
    data = RecordFaceDataset(str(ds))
    assert [int(data[i][1]) for i in range(len(data))] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_label_outside_the_header_classes(ds, capsys):
    (ds / "property").unlink()  # the header's count alone
    set_label(ds, 3, 999.0)  # dataset position 2
    rc, err = inspect(ds, capsys, "--verify")
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(ds / "train.rec") in err and "record 3" in err and "999" in err
    assert "[0, 4)" in err and "identity records named by record 0" in err
    data = RecordFaceDataset(str(ds))
    assert int(data[1][1]) == 0
    with pytest.raises(RecordIOError, match=r"train\.rec: record 3 \(dataset position 2\) has "
                                            r"label 999\.0, not a class id in \[0, 4\)"):
        data[2]


def test_label_outside_the_property_classes(ds, capsys):
    (ds / "property").write_text("3,112,112\n")  # fewer classes than the .rec holds
    for flags in ((), ("--verify",)):
        rc, err = inspect(ds, capsys, *flags)
        assert rc == 2 and "record 7" in err and str(ds / "property") in err and "[0, 3)" in err
    with pytest.raises(RecordIOError, match=r"record 7 \(dataset position 6\).*num_classes 3"):
        RecordFaceDataset(str(ds))[6]
    (ds / "property").write_text("many,112,112\n")
    with pytest.raises(RecordIOError, match=r"property: expected 'num_classes,height,width'"):
        RecordFaceDataset(str(ds))


def test_nan_and_fractional_labels(ds, capsys):
    set_label(ds, 2, math.nan)
    rc, err = inspect(ds, capsys, "--verify")
    assert rc == 2 and "record 2" in err and "nan" in err
    with pytest.raises(RecordIOError, match=r"train\.rec: record 2 \(dataset position 1\) has "
                                            r"label nan"):
        RecordFaceDataset(str(ds))[1]
    set_label(ds, 2, 0.5)
    with pytest.raises(RecordIOError, match=r"record 2 .*label 0\.5"):
        RecordFaceDataset(str(ds))[1]


def test_nan_header_range(ds, capsys):
    set_label(ds, 0, math.nan)
    rc, err = inspect(ds, capsys)
    assert rc == 2 and str(ds / "train.rec") in err and "record 0" in err
    with pytest.raises(RecordIOError, match=r"train\.rec: record 0 is a header"):
        RecordFaceDataset(str(ds))


def test_empty_idx(ds, capsys):
    (ds / "train.idx").write_text("")
    rc, err = inspect(ds, capsys)
    assert rc == 2 and str(ds / "train.idx") in err and "no entries" in err
    with pytest.raises(RecordIOError, match="no entries"):
        RecordFaceDataset(str(ds))
    with pytest.raises(RecordIOError, match="no entries"):
        IdentityIndex.from_rec(ds / "train.rec", cache=False)


def test_idx_cut_short(ds, capsys):
    lines = (ds / "train.idx").read_text().splitlines(keepends=True)
    (ds / "train.idx").write_text("".join(lines[:-2]))  # two identity records lost
    rc, err = inspect(ds, capsys)
    assert rc == 2 and "train.idx: the last indexed record (10, line 11)" in err
    assert "no entry" in err
    with pytest.raises(RecordIOError, match="no entry"):
        RecordFaceDataset(str(ds))


def test_idx_missing_an_image_entry(ds, capsys):
    at = offsets(ds)[2]
    lines = (ds / "train.idx").read_text().splitlines(keepends=True)
    (ds / "train.idx").write_text("".join(lines[:2] + lines[3:]))  # no key 2
    r = MXIndexedRecordIO(ds / "train.idx", ds / "train.rec", "r")
    with pytest.raises(RecordIOError, match=f"train.idx: the record at byte {at} of "
                                            f".*train.rec has no entry"):
        r.check_coverage(full=True)
    # the index's spot check, which draws every image of so small a file, meets it first
    for flags in ((), ("--verify",)):
        rc, err = inspect(ds, capsys, *flags)
        assert rc == 2 and f"train.idx: record 2 is not in the index of {ds / 'train.rec'}" in err
    with pytest.raises(RecordIOError, match=r"train\.idx: record 2 is not in the index"):
        RecordFaceDataset(str(ds))
    r = MXIndexedRecordIO(ds / "train.idx", ds / "train.rec", "r")
    with pytest.raises(KeyError) as e:  # still a KeyError, as mxnet's, but it names the files
        r.read_idx(2)
    assert isinstance(e.value, RecordIOError) and str(e.value).startswith(str(ds / "train.idx"))


def test_negative_idx_entry(ds, capsys):
    lines = (ds / "train.idx").read_text().splitlines(keepends=True)
    lines[2] = "2\t-8\n"
    (ds / "train.idx").write_text("".join(lines))
    rc, err = inspect(ds, capsys)
    assert rc == 2 and "train.idx: record 2 (line 3) points to byte -8, before the start" in err
    with pytest.raises(RecordIOError, match=r"record 2 \(line 3\) points to byte -8"):
        RecordFaceDataset(str(ds))


def test_label_contradicting_its_identity_range(ds, capsys):
    set_label(ds, 3, 2.0)  # inside identity 1's range [3, 5), a valid class id, the wrong one
    assert inspect(ds, capsys)[0] == 0  # the cheap check does not read image labels
    rc, err = inspect(ds, capsys, "--verify")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert (f"{ds / 'train.rec'}: record 3 (dataset position 2) has label 2, but identity record "
            f"10 of the header puts records [3, 5) in identity 1") in err


def test_spot_check_reaches_every_image_of_a_small_file(tmp_path):
    """64 images and 64 draws: drawn without replacement, every image is checked, so any
    label that contradicts the header sends the index to the label scan."""
    faces = tmp_path / "faces"
    for c in range(4):
        (faces / f"id{c}").mkdir(parents=True)
        for j in range(16):
            (faces / f"id{c}" / f"{j}.png").write_bytes(
                encode_image(np.full((4, 4), 16 * c + j, np.uint8), ".png"))
    out = tmp_path / "ds"
    out.mkdir()
    build_rec(faces, out, resize=None, img_fmt=".png")
    missed = []
    for key in range(1, 65):
        right = (key - 1) // 16
        set_label(out, key, float((right + 1) % 4), images=range(1, 65))
        index = IdentityIndex.from_rec(out / "train.rec", cache=False)
        if not index.source.startswith("label scan"):
            missed.append(key)
        set_label(out, key, float(right), images=range(1, 65))
    assert missed == []
    assert IdentityIndex.from_rec(out / "train.rec", cache=False).source.startswith("header")


def test_fractional_identity_range(ds, capsys):
    set_label(ds, 10, 3.5, field=0)  # identity 1's range [3, 5) becomes [3.5, 5)
    rc, err = inspect(ds, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{ds / 'train.rec'}: identity record 10 has range [3.5, 5.0]" in err
    with pytest.raises(RecordIOError, match="identity record 10 has range"):
        IdentityIndex.from_rec(ds / "train.rec", cache=False)


def test_float_labels_must_be_integral():
    index = IdentityIndex.from_labels(np.array([0.0, 0.0, 3.0, 1.0]))  # integral floats: fine
    assert index.identity_labels.tolist() == [0, 1, 3]
    assert index.identity_labels.dtype == np.int64
    with pytest.raises(RecordIOError, match=r"label at dataset position 2 is 2\.5, not an "
                                            r"integer class id"):
        IdentityIndex.from_labels(np.array([0.0, 1.0, 2.5, 1.0]))
    with pytest.raises(RecordIOError, match=r"position 1 is nan"):
        IdentityIndex.from_labels(np.array([0.0, np.nan]))
    # a position that is not an image carries no class: its label is not looked at
    index = IdentityIndex.from_labels(np.array([0.0, 0.5, 1.0]),
                                      valid=np.array([True, False, True]))
    assert index.identity_labels.tolist() == [0, 1] and index.num_images == 2
    with pytest.raises(RecordIOError, match=r"the start of identity 1 is 2\.5"):
        IdentityIndex.from_ranges(np.array([1.0, 2.5]), np.array([2.0, 4.0]))
