"""Byte-for-byte cross-compatibility with real mxnet 1.9.1 (``mx.recordio``, ``mx.image``).

Runs only where mxnet imports (the separate environment built by .ci/mxnet_compat.sh:
mxnet==1.9.1, numpy==1.23.5, pillow); skipped elsewhere. Files go both ways: mxnet writes and
the plugin reads, the plugin writes and mxnet reads, and both writers are compared byte for byte.
"""
import io
import os
import pickle
import struct
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():  # mxnet 1.9.1 warns about numpy aliases on import
    warnings.simplefilter("ignore")
    if os.environ.get("OTFACE_REQUIRE_MXNET"):  # the CI script: a missing mxnet is a failure
        import mxnet as mx
    else:
        mx = pytest.importorskip("mxnet", reason="needs the mxnet env (.ci/mxnet_compat.sh)")

from PIL import Image  # noqa: E402

from otface_plugin.data import recordio as R  # noqa: E402
from otface_plugin.data.identity_index import IdentityIndex  # noqa: E402
from otface_plugin.data.imagecodec import decode_image, encode_image  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAGIC = struct.pack("<I", 0xCED7230A)


def payloads():
    rng = np.random.default_rng(0)
    out = [b"", b"a", b"abcd", b"abcde", MAGIC, b"x" + MAGIC, b"xxxx" + MAGIC, MAGIC * 3,
           b"yy" + MAGIC * 3 + b"q", MAGIC + b"\0" * 3]
    for n in list(rng.integers(0, 400, size=30)) + [70000]:
        buf = bytearray(rng.bytes(int(n)))
        for _ in range(int(rng.integers(0, 5))):
            if len(buf) >= 4:
                at = int(rng.integers(0, len(buf) - 3)) & ~int(rng.integers(0, 2) * 3)
                buf[at:at + 4] = MAGIC
        out.append(bytes(buf))
    return out


def write_both(tmp_path, items, key_type=int):
    """Write the same (key, bytes) items with mxnet and with the plugin."""
    mw = mx.recordio.MXIndexedRecordIO(str(tmp_path / "mx.idx"), str(tmp_path / "mx.rec"), "w",
                                       key_type)
    pw = R.MXIndexedRecordIO(tmp_path / "pl.idx", tmp_path / "pl.rec", "w", key_type)
    for k, buf in items:
        mw.write_idx(k, buf)
        pw.write_idx(k, buf)
    mw.close()
    pw.close()


def test_raw_records_byte_identical_both_ways(tmp_path):
    items = list(enumerate(payloads()))
    write_both(tmp_path, items)
    assert (tmp_path / "mx.rec").read_bytes() == (tmp_path / "pl.rec").read_bytes()
    assert (tmp_path / "mx.idx").read_bytes() == (tmp_path / "pl.idx").read_bytes()
    # mxnet file, plugin reader (random order and sequential)
    pr = R.MXIndexedRecordIO(tmp_path / "mx.idx", tmp_path / "mx.rec", "r")
    for k in np.random.default_rng(1).permutation(len(items)):
        assert pr.read_idx(int(k)) == items[k][1]
    assert list(R.MXRecordIO(str(tmp_path / "mx.rec"), "r")) == [b for _, b in items]
    # plugin file, mxnet reader
    mr = mx.recordio.MXIndexedRecordIO(str(tmp_path / "pl.idx"), str(tmp_path / "pl.rec"), "r")
    for k, buf in items:
        assert mr.read_idx(k) == buf
    assert list(mr.keys) == list(pr.keys)
    seq = mx.recordio.MXRecordIO(str(tmp_path / "pl.rec"), "r")
    assert [seq.read() for _ in items] == [b for _, b in items] and seq.read() is None


def test_string_keys(tmp_path):
    items = [("b", b"1"), ("a", b"22"), ("z", MAGIC)]
    write_both(tmp_path, items, key_type=str)
    assert (tmp_path / "mx.idx").read_bytes() == (tmp_path / "pl.idx").read_bytes()
    pr = R.MXIndexedRecordIO(tmp_path / "mx.idx", tmp_path / "mx.rec", "r", key_type=str)
    assert pr.read_idx("z") == MAGIC


HEADERS = [
    (0, 3.0, 5, 0), (7, 12.0, 2 ** 40, 3), (0, np.float32(2.5), 1, 1),
    (0, [1.5, 2.5], 9, 0), (0, [1001.0, 1011.0], 0, 0), (0, np.arange(7, dtype=np.float64), 4, 2),
    (0, np.array([3.0]), 0, 0), (0, [0.0, -1e30, 1e-30, 16777217.0], 0, 0),
]


@pytest.mark.parametrize("header", HEADERS)
def test_pack_unpack_byte_identical(header):
    body = b"\x89PNG" + MAGIC + b"payload"
    mine, theirs = R.pack(header, body), mx.recordio.pack(mx.recordio.IRHeader(*header), body)
    assert mine == theirs
    for a, b in ((R.unpack(theirs), mx.recordio.unpack(theirs)),
                 (R.unpack(mine), mx.recordio.unpack(mine))):
        (ha, pa), (hb, pb) = a, b
        assert pa == pb == body
        assert (ha.flag, ha.id, ha.id2) == (hb.flag, hb.id, hb.id2)
        np.testing.assert_array_equal(np.asarray(ha.label), np.asarray(hb.label))
        assert type(ha.label) is type(hb.label)


def _insightface_items(counts, fmt, multi_label=False):
    """Record 0 header, images (PIL-encoded), identity records, as mxnet's tools lay them out."""
    rng = np.random.default_rng(0)
    n = sum(counts)
    items = [(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1.0, n + 1.0 + len(counts)], 0,
                                                       0), b""))]
    key, ranges, images = 1, [], {}
    for c, k in enumerate(counts):
        ranges.append((key, key + k))
        for _ in range(k):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            img = np.repeat(np.repeat(img[::4, ::4], 4, 0), 4, 1)  # JPEG-friendly blocks
            images[key] = img
            label = [float(c), 0.5, 7.0] if multi_label else float(c)
            items.append((key, mx.recordio.pack(mx.recordio.IRHeader(0, label, key, 0),
                                                encode_image(img, fmt))))
            key += 1
    for a, b in ranges:
        items.append((key, mx.recordio.pack(mx.recordio.IRHeader(0, [a, b], 0, 0), b"")))
        key += 1
    return items, images


@pytest.mark.parametrize("multi_label", [False, True])
def test_insightface_file_written_by_mxnet_read_by_plugin(tmp_path, multi_label):
    counts = [3, 1, 4, 2]
    items, images = _insightface_items(counts, ".png", multi_label)
    mw = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"),
                                       str(tmp_path / "train.rec"), "w")
    for k, buf in items:
        mw.write_idx(k, buf)
    mw.close()
    head = IdentityIndex.from_rec(tmp_path / "train.rec", cache=False)
    scan = IdentityIndex.from_rec(tmp_path / "train.rec", use_header=False, cache=False)
    assert head.source.startswith("header") and scan.source.startswith("label scan")
    for index in (head, scan):
        np.testing.assert_array_equal(index.counts, counts)
    np.testing.assert_array_equal(head.labels(), scan.labels())
    pr = R.MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    h0, _ = R.unpack(pr.read_idx(0))
    assert h0.flag == 2 and list(h0.label) == [11.0, 15.0]
    for k, img in images.items():
        h, payload = R.unpack(pr.read_idx(k))
        rgb = decode_image(payload)
        np.testing.assert_array_equal(rgb, img)
        np.testing.assert_array_equal(rgb, mx.image.imdecode(payload).asnumpy())
        _, bgr = R.unpack_img(pr.read_idx(k))
        np.testing.assert_array_equal(bgr, mx.image.imdecode(payload, to_rgb=False).asnumpy())


def test_rec_built_by_plugin_reads_like_mxfacedataset(tmp_path):
    from otface_plugin.data.rec_builder import build_rec

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for c in range(5):
        (root / f"id{c}").mkdir(parents=True)
        for j in range(c + 1):
            arr = rng.integers(0, 256, (30, 26), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"id{c}" / f"{j}.png")
    build_rec(root, str(tmp_path / "ds") + "/", workers=1, progress=False)
    # exactly the recipe's MXFaceDataset.__init__/__getitem__ logic, with real mxnet
    imgrec = mx.recordio.MXIndexedRecordIO(str(tmp_path / "ds/train.idx"),
                                           str(tmp_path / "ds/train.rec"), "r")
    header, _ = mx.recordio.unpack(imgrec.read_idx(0))
    assert header.flag > 0
    imgidx = np.array(range(1, int(header.label[0])))
    assert len(imgidx) == 15
    pr = R.MXIndexedRecordIO(tmp_path / "ds/train.idx", tmp_path / "ds/train.rec", "r")
    labels = []
    for idx in imgidx:
        raw = imgrec.read_idx(int(idx))
        assert raw == pr.read_idx(int(idx))
        h, img = mx.recordio.unpack(raw)
        sample = mx.image.imdecode(img).asnumpy()
        assert sample.shape == (112, 112, 3)
        ours = decode_image(img)
        # same JPEG bytes; the two libjpeg builds may round the IDCT differently
        assert np.abs(ours.astype(int) - sample.astype(int)).max() <= 2
        labels.append(int(h.label))
    assert labels == [c for c in range(5) for _ in range(c + 1)]
    index = IdentityIndex.from_rec(tmp_path / "ds/train.rec", cache=False)
    for c in range(5):  # identity records, as mxnet reads them
        h, _ = mx.recordio.unpack(imgrec.read_idx(int(header.label[0]) + c))
        pos = index.positions(c)
        assert (int(h.label[0]), int(h.label[1])) == (pos[0] + 1, pos[-1] + 2)


def test_bin_loads_with_mxnet_imdecode(tmp_path):
    from otface_plugin.data.bin_builder import build_bin

    root = tmp_path / "faces"
    rng = np.random.default_rng(1)
    for c in range(4):
        (root / f"id{c}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / f"id{c}" / f"{j}.png")
    build_bin(root, tmp_path / "v.bin", 8, folds=2, progress=False)
    try:  # recipe's load_bin, verbatim logic
        with open(tmp_path / "v.bin", "rb") as f:
            bins, issame_list = pickle.load(f)
    except UnicodeDecodeError:
        with open(tmp_path / "v.bin", "rb") as f:
            bins, issame_list = pickle.load(f, encoding="bytes")
    assert len(issame_list) == 8 and len(bins) == 16
    for b in bins:
        img = mx.image.imdecode(b)
        assert img.shape == (112, 112, 3)
        pil = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        assert np.abs(pil.astype(int) - img.asnumpy().astype(int)).max() <= 2


def test_imdecode_of_16bit_and_exif_oriented_payloads(tmp_path):
    """decode_image matches mx.image.imdecode where Pillow alone does not: a 16-bit PNG is its
    high byte (Pillow's convert saturates it), and the EXIF orientation of a payload is not
    applied (mxnet 1.9.1's decoder ignores it; build-rec stores images upright without EXIF)."""
    a = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    buf = (tmp_path / "g16.png").read_bytes()
    for flag in (0, 1):
        np.testing.assert_array_equal(decode_image(buf, flag=flag),
                                      mx.image.imdecode(buf, flag=flag).asnumpy())
    exif = Image.Exif()
    exif[0x0112] = 6
    img = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "o6.png", exif=exif.tobytes())
    buf = (tmp_path / "o6.png").read_bytes()
    np.testing.assert_array_equal(decode_image(buf), mx.image.imdecode(buf).asnumpy())
