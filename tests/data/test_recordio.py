"""RecordIO framing, IRHeader packing and image records, checked against hand-derived bytes.

The cross-check against real mxnet lives in tests/mxnet_compat (run by .ci/mxnet_compat.sh).
"""
import pickle
import struct

import numpy as np
import pytest

from otface_plugin.data import (IRHeader, MXIndexedRecordIO, MXRecordIO, RecordIOError, pack,
                                pack_img, unpack, unpack_img)
from otface_plugin.data.imagecodec import decode_image, encode_image
from otface_plugin.data.recordio import MAGIC, MissingRecordError, frame_record, split_lrec

M = struct.pack("<I", MAGIC)


def lrec(cflag, n):
    return M + struct.pack("<I", (cflag << 29) | n)


def test_magic_bytes_are_dmlc_little_endian():
    assert M == bytes([0x0A, 0x23, 0xD7, 0xCE])


@pytest.mark.parametrize("payload,expected", [
    (b"", lrec(0, 0)),
    (b"abcd", lrec(0, 4) + b"abcd"),
    (b"abcde", lrec(0, 5) + b"abcde" + b"\0\0\0"),
    # magic at an aligned offset splits the record; the magic itself is not stored
    (b"ab\0\0" + M + b"xy", lrec(1, 4) + b"ab\0\0" + lrec(3, 2) + b"xy" + b"\0\0"),
    (M, lrec(1, 0) + lrec(3, 0)),
    (M + M + b"z", lrec(1, 0) + lrec(2, 0) + lrec(3, 1) + b"z\0\0\0"),
    # unaligned magic: no split
    (b"a" + M, lrec(0, 5) + b"a" + M + b"\0\0\0"),
])
def test_frame_record_matches_dmlc_layout(payload, expected):
    assert frame_record(payload) == expected


def _payloads(rng):
    out = [b"", b"a", b"abcd", M, b"x" + M, b"xxxx" + M, M * 3, b"yy" + M * 3 + b"q"]
    for n in rng.integers(0, 300, size=40):
        buf = bytearray(rng.bytes(int(n)))
        for _ in range(rng.integers(0, 4)):  # sprinkle magics at aligned and unaligned offsets
            if len(buf) >= 4:
                at = int(rng.integers(0, len(buf) - 3))
                buf[at:at + 4] = M
        out.append(bytes(buf))
    return out


def test_roundtrip_sequential_and_indexed(tmp_path):
    payloads = _payloads(np.random.default_rng(0))
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    offsets = []
    for i, p in enumerate(payloads):
        offsets.append(w.tell())
        w.write_idx(i, p)
    w.close()
    assert (tmp_path / "a.rec").read_bytes() == b"".join(frame_record(p) for p in payloads)
    assert (tmp_path / "a.idx").read_text() == "".join(
        f"{i}\t{o}\n" for i, o in enumerate(offsets))
    r = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    for i in np.random.default_rng(1).permutation(len(payloads)):
        assert r.read_idx(int(i)) == payloads[i]
    assert list(r.keys) == list(range(len(payloads)))
    assert r.idx[3] == offsets[3]
    with pytest.raises(KeyError):
        r.read_idx(len(payloads))
    r.close()
    seq = MXRecordIO(str(tmp_path / "a.rec"), "r")
    assert [seq.read() for _ in payloads] == payloads
    assert seq.read() is None
    seq.reset()
    assert list(seq) == payloads


def test_non_contiguous_and_duplicate_keys(tmp_path):
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    for k in (10, 3, 7, 3):  # the later duplicate wins, as in mxnet's dict
        w.write_idx(k, b"rec%d" % k + bytes([len(w.keys)]))
    w.close()
    r = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    assert r.read_idx(10) == b"rec10\x00" and r.read_idx(7) == b"rec7\x02"
    assert r.read_idx(3) == b"rec3\x03"
    assert 5 not in r.idx and 7 in r.idx


@pytest.mark.parametrize("keys", [(1, 2, 3, 4), (10, 3, 7, 3)], ids=["consecutive", "sorted-lookup"])
def test_offsets_of_is_the_vectorised_key_lookup(tmp_path, keys):
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    for k in keys:
        w.write_idx(k, b"x" * k)
    w.close()
    r = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    ask = np.array(sorted(set(keys), reverse=True))
    assert r.offsets_of(ask).tolist() == [r.idx[int(k)] for k in ask]  # last duplicate wins
    with pytest.raises(MissingRecordError, match=r"a\.idx: identity record 5 is not in the index "
                                                 r"of .*a\.rec \(2 keys missing\)"):
        r.offsets_of(np.array([keys[0], 5, 99]), "identity record")
    assert r.missing_keys(np.array([5, keys[0], 99])).tolist() == [5, 99]


def test_split_lrec_on_ints_and_arrays():
    assert split_lrec((3 << 29) | 12345) == (3, 12345)
    cflag, length = split_lrec(np.array([(1 << 29) | 7, 8], dtype=np.uint32))
    assert cflag.tolist() == [1, 0] and length.tolist() == [7, 8]


def test_string_keys_use_slow_path(tmp_path):
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w", key_type=str)
    w.write_idx("img_b", b"B")
    w.write_idx("img_a", b"A")
    w.close()
    r = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r", key_type=str)
    assert r.keys == ["img_b", "img_a"] and r.read_idx("img_a") == b"A"


def test_reader_pickles_and_reopens(tmp_path):
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    for i in range(5):
        w.write_idx(i, b"x" * i)
    with pytest.raises(TypeError):
        pickle.dumps(w)
    w.close()
    r = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.read_idx(4) == b"xxxx" and r.read_idx(3) == b"xxx"


def test_pack_scalar_label_layout():
    s = pack(IRHeader(5, 3.0, 42, 7), b"payload")
    # flag forced to 0 for a scalar label; 'IfQQ' little-endian, no padding (24 bytes)
    assert s == struct.pack("<IfQQ", 0, 3.0, 42, 7) + b"payload"
    h, p = unpack(s)
    assert h == IRHeader(0, 3.0, 42, 7) and p == b"payload"


@pytest.mark.parametrize("label", [[1.5, 2.5], [0.0, 1e6, -3.25, 7.0], np.arange(5.0)])
def test_pack_multi_float_label(label):
    s = pack(IRHeader(0, label, 9, 0), b"zz")
    lab = np.asarray(label, dtype=np.float32)
    assert s == struct.pack("<IfQQ", lab.size, 0.0, 9, 0) + lab.tobytes() + b"zz"
    h, p = unpack(s)
    assert h.flag == lab.size and h.id == 9 and p == b"zz"
    np.testing.assert_array_equal(h.label, lab)
    assert h.label.dtype == np.float32


def test_insightface_header_record_roundtrip():
    s = pack(IRHeader(0, [1001.0, 1011.0], 0, 0), b"")
    assert len(s) == 32 and len(frame_record(s)) == 40
    h, p = unpack(s)
    assert (h.flag, list(h.label), p) == (2, [1001.0, 1011.0], b"")


def test_unpack_rejects_short_records():
    with pytest.raises(RecordIOError, match="too short"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="float labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)


def test_pack_img_png_is_lossless_and_bgr_like_mxnet():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    s = pack_img(IRHeader(0, 1.0, 0, 0), bgr, quality=3, img_fmt=".png")
    h, img = unpack_img(s)
    assert h.label == 1.0
    np.testing.assert_array_equal(img, bgr)  # BGR in, BGR out, as cv2/mxnet
    _, payload = unpack(s)
    np.testing.assert_array_equal(decode_image(payload), bgr[:, :, ::-1])  # imdecode is RGB
    _, rgb = unpack_img(s, channel_order="rgb")
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_pack_img_jpeg_and_iscolor_modes():
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    s = pack_img(IRHeader(0, 0.0, 0, 0), gray)  # defaults: .jpg, quality 95
    _, payload = unpack(s)
    assert payload[:3] == b"\xff\xd8\xff"
    _, img = unpack_img(s)  # -1: as stored -> 2-D grayscale
    assert img.shape == (32, 32) and np.abs(img.astype(int) - gray).max() <= 3
    assert unpack_img(s, 1)[1].shape == (32, 32, 3)
    assert unpack_img(s, 0)[1].shape == (32, 32)
    assert decode_image(payload).shape == (32, 32, 3)
    assert decode_image(payload, flag=0).shape == (32, 32, 1)


def test_encode_image_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8), img_fmt=".gif")


def test_write_requires_bytes(tmp_path):
    w = MXRecordIO(str(tmp_path / "a.rec"), "w")
    with pytest.raises(TypeError):
        w.write("text")
    w.close()
    with pytest.raises(ValueError):
        MXRecordIO(str(tmp_path / "a.rec"), "x")


def test_reads_survive_fork_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    w = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    for i in range(64):
        w.write_idx(i, pack(IRHeader(0, float(i), i, 0), bytes([i]) * (i + 1)))
    w.close()
    reader = MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    reader.read_idx(5)  # opened and used in the parent, as MXFaceDataset does

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            h, p = unpack(reader.read_idx(i))
            return int(h.label), len(p)

    loader = torch.utils.data.DataLoader(DS(), batch_size=8, num_workers=2)
    labels, sizes = zip(*[(a.tolist(), b.tolist()) for a, b in loader])
    assert sum(labels, []) == list(range(64))
    assert sum(sizes, []) == [i + 1 for i in range(64)]
