"""IdentityIndex: header ranges, label scan, cache staleness, read-only fallback."""
import os
import shutil

import numpy as np
import pytest

from otface_plugin import atomicfile
from otface_plugin.data import IdentityIndex, IRHeader, MXIndexedRecordIO, RecordIOError, pack
from otface_plugin.data import identity_index as ii


def write_insightface_rec(path_prefix, counts, label_of=lambda c: c, header=True,
                          multi_label=False):
    """InsightFace layout with tiny non-image payloads (the index never decodes images)."""
    rec, idx = f"{path_prefix}.rec", f"{path_prefix}.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    n = int(sum(counts))
    key = 0
    if header:
        w.write_idx(0, pack(IRHeader(0, [n + 1.0, n + 1.0 + len(counts)], 0, 0), b""))
        key = 1
    ranges = []
    for c, k in enumerate(counts):
        ranges.append((key, key + k))
        for _ in range(k):
            lab = [float(label_of(c)), 7.0] if multi_label else float(label_of(c))
            w.write_idx(key, pack(IRHeader(0, lab, key, 0), b"img%d" % key))
            key += 1
    if header:
        for a, b in ranges:
            w.write_idx(key, pack(IRHeader(0, [float(a), float(b)], 0, 0), b""))
            key += 1
    w.close()
    return rec, idx


def as_sets(index):
    return {int(index.identity_labels[c]): sorted(index.positions(c).tolist())
            for c in range(index.num_identities)}


COUNTS = [3, 1, 5, 2, 4]


def expected_sets(counts, base=0):
    out, pos = {}, base
    for c, k in enumerate(counts):
        out[c] = list(range(pos, pos + k))
        pos += k
    return out


def test_from_header_ranges(tmp_path):
    rec, _ = write_insightface_rec(tmp_path / "train", COUNTS)
    index = IdentityIndex.from_rec(rec)
    assert index.source.startswith("header ranges")
    assert (index.num_identities, index.num_images, index.num_positions) == (5, 15, 15)
    assert index.order is None  # contiguous ranges: O(identities) memory
    assert as_sets(index) == expected_sets(COUNTS)
    np.testing.assert_array_equal(index.counts, COUNTS)
    # dataset position i is record i + 1 (MXFaceDataset: imgidx = range(1, header.label[0]))
    np.testing.assert_array_equal(index.record_ids(index.positions(2)), [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(index.labels(), np.repeat(np.arange(5), COUNTS))
    assert not os.path.exists(str(rec) + ii.CACHE_SUFFIX)  # nothing to cache


def test_label_scan_agrees_with_header_and_is_cached(tmp_path):
    rec, idx = write_insightface_rec(tmp_path / "train", COUNTS)
    scanned = IdentityIndex.from_rec(rec, use_header=False)
    assert scanned.source.startswith("label scan")
    assert as_sets(scanned) == expected_sets(COUNTS)
    cache = str(rec) + ii.CACHE_SUFFIX
    assert os.path.isfile(cache)
    again = IdentityIndex.from_rec(rec, use_header=False)
    assert again.source.startswith("cache") and as_sets(again) == as_sets(scanned)
    np.testing.assert_array_equal(again.record_ids(again.positions(4)), [12, 13, 14, 15])


def test_stale_cache_is_rebuilt(tmp_path):
    rec, _ = write_insightface_rec(tmp_path / "train", COUNTS)
    IdentityIndex.from_rec(rec, use_header=False)
    write_insightface_rec(tmp_path / "train", [2, 2])  # same path, new content
    index = IdentityIndex.from_rec(rec, use_header=False)
    assert index.source.startswith("label scan") and as_sets(index) == expected_sets([2, 2])


def test_cache_of_another_file_is_not_used(tmp_path):
    a, _ = write_insightface_rec(tmp_path / "a", COUNTS)
    IdentityIndex.from_rec(a, use_header=False)
    (tmp_path / "b").mkdir()
    for ext in (".rec", ".idx", ".rec" + ii.CACHE_SUFFIX):  # copied with mtimes preserved
        shutil.copy2(str(tmp_path / "a") + ext, str(tmp_path / "b" / "a") + ext)
    index = IdentityIndex.from_rec(tmp_path / "b" / "a.rec", use_header=False)
    assert index.source.startswith("label scan")


def test_read_only_dataset_dir_falls_back_to_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rec, _ = write_insightface_rec(data / "train", COUNTS)
    real_create = atomicfile.create_new

    def create_new(path):  # root ignores chmod, so simulate EACCES
        if os.path.samefile(os.path.dirname(path), data):
            raise PermissionError(13, "Permission denied", str(data))
        return real_create(path)

    monkeypatch.setattr(atomicfile, "create_new", create_new)
    monkeypatch.setenv("OTFACE_CACHE_DIR", str(tmp_path / "cache"))
    IdentityIndex.from_rec(rec, use_header=False)
    assert sorted(os.listdir(data)) == ["train.idx", "train.rec"]  # nothing written there
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith(ii.CACHE_SUFFIX)
    assert IdentityIndex.from_rec(rec, use_header=False).source.startswith("cache")


def test_no_header_uses_idx_keys(tmp_path):
    rec, _ = write_insightface_rec(tmp_path / "plain", [2, 3], label_of=lambda c: 10 * c,
                                   header=False)
    index = IdentityIndex.from_rec(rec, cache=False)
    assert index.num_positions == 5
    assert as_sets(index) == {0: [0, 1], 10: [2, 3, 4]}
    np.testing.assert_array_equal(index.record_ids([0, 4]), [0, 4])


def test_labels_not_matching_header_numbering_fall_back_to_scan(tmp_path):
    rec, _ = write_insightface_rec(tmp_path / "train", COUNTS, label_of=lambda c: 100 + c)
    index = IdentityIndex.from_rec(rec, cache=False)
    assert index.source.startswith("label scan")
    assert sorted(index.identity_labels.tolist()) == [100, 101, 102, 103, 104]


def test_multi_float_image_labels_use_first_value(tmp_path):
    rec, _ = write_insightface_rec(tmp_path / "train", COUNTS, multi_label=True)
    index = IdentityIndex.from_rec(rec, use_header=False, cache=False)
    assert as_sets(index) == expected_sets(COUNTS)


def test_header_range_outside_images_is_an_error(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    w.write_idx(0, pack(IRHeader(0, [3.0, 4.0], 0, 0), b""))
    w.write_idx(1, pack(IRHeader(0, 0.0, 1, 0), b"a"))
    w.write_idx(2, pack(IRHeader(0, 0.0, 2, 0), b"b"))
    w.write_idx(3, pack(IRHeader(0, [1.0, 9.0], 0, 0), b""))
    w.close()
    with pytest.raises(RecordIOError, match="outside the image records"):
        IdentityIndex.from_rec(rec, cache=False)


@pytest.mark.parametrize("seed", range(5))
def test_from_ranges_matches_naive(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=30)
    gaps = rng.integers(0, 3, size=30)
    starts = 1 + np.cumsum(np.r_[0, (counts + gaps)[:-1]])
    perm = rng.permutation(30)  # identity records need not be in image order
    index = IdentityIndex.from_ranges(starts[perm], (starts + counts)[perm])
    expect = {int(c): list(range(s - 1, s - 1 + k))
              for c, (s, k) in enumerate(zip(starts[perm], counts[perm])) if k}
    assert as_sets(index) == expect
    with pytest.raises(RecordIOError, match="overlap"):
        IdentityIndex.from_ranges([1, 3], [5, 6])


@pytest.mark.parametrize("seed", range(5))
def test_from_labels_matches_naive(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 20, size=200) * 3
    valid = rng.random(200) > 0.1
    index = IdentityIndex.from_labels(labels, valid=valid)
    expect = {}
    for i, (lab, ok) in enumerate(zip(labels.tolist(), valid)):
        if ok:
            expect.setdefault(lab, []).append(i)
    assert as_sets(index) == expect
    assert index.num_images == int(valid.sum()) and index.num_positions == 200


def test_save_load_roundtrip(tmp_path):
    index = IdentityIndex.from_labels(np.array([2, 0, 2, 1]), record_keys=np.array([9, 8, 7, 6]))
    index.save(tmp_path / "i.npz", {"note": "x"})
    back, meta = IdentityIndex.load(tmp_path / "i.npz")
    assert meta == {"note": "x"} and as_sets(back) == as_sets(index)
    np.testing.assert_array_equal(back.record_ids([0, 3]), [9, 6])


def test_records_split_by_a_magic_in_their_header_are_read_correctly(tmp_path):
    """An IRHeader id equal to the magic splits the record inside its header (multi-part):
    the vectorised gathers must notice and fall back to whole-record reads."""
    magic_id = 0xCED7230A  # id sits at payload offset 8: 4-byte aligned, so dmlc splits there
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    w.write_idx(0, pack(IRHeader(0, [6.0, 8.0], magic_id, 0), b""))
    for k, c in zip(range(1, 6), [0, 0, 0, 1, 1]):
        w.write_idx(k, pack(IRHeader(0, float(c), magic_id if k % 2 else k, 0), b"x"))
    w.write_idx(6, pack(IRHeader(0, [1.0, 4.0], magic_id, 0), b""))
    w.write_idx(7, pack(IRHeader(0, [4.0, 6.0], 0, 0), b""))
    w.close()
    assert int.from_bytes(rec.read_bytes()[4:8], "little") >> 29 == 1  # record 0 is split
    for use_header in (True, False):
        index = IdentityIndex.from_rec(rec, use_header=use_header, cache=False)
        assert as_sets(index) == {0: [0, 1, 2], 1: [3, 4]}


def test_label_scan_skips_records_that_are_not_images(tmp_path):
    """Identity/header-style records (labels but no payload) are not images, even without a
    record-0 header to say where they are."""
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    w.write_idx(0, pack(IRHeader(0, 2.0, 0, 0), b"img"))
    w.write_idx(1, pack(IRHeader(0, [1.0, 3.0], 0, 0), b""))  # identity-like, empty payload
    w.write_idx(2, pack(IRHeader(0, 2.0, 0, 0), b"img"))
    w.write_idx(3, pack(IRHeader(0, [5.0, 1.0], 0, 0), b"img"))  # multi-label image: class 5
    w.write_idx(4, b"short")  # too short for an IRHeader
    w.close()
    with pytest.raises(RecordIOError, match=r"t\.rec: record 4: .*too short"):
        IdentityIndex.from_rec(rec, cache=False)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(RecordIOError, match=r"t\.idx: the last indexed record \(3, line 4\).*no entry"):
        IdentityIndex.from_rec(rec, cache=False)  # an .idx that does not cover the .rec
    with open(rec, "r+b") as f:
        f.truncate(int(lines[4].split("\t")[1]))  # drop record 4 itself
    index = IdentityIndex.from_rec(rec, cache=False)
    assert as_sets(index) == {2: [0, 2], 5: [3]} and index.num_positions == 4
