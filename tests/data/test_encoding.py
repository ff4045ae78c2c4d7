"""data/encoding.py directly (the builders' CLI tests reach it through build-rec/build-bin): the
results come in input order, with or without worker processes, and a bad file is a result, not
an exception."""
from otface_plugin.data.encoding import encode_files, progress_bar
from otface_plugin.data.imagecodec import decode_image

from helpers import make_faces


def test_encode_files_keeps_the_order_and_reports_bad_files(tmp_path):
    root = make_faces(tmp_path / "faces", n_id=3, n_img=4, size=8)
    paths = sorted(root.glob("*/*.png"))
    bad = tmp_path / "faces" / "id1" / "broken.png"
    bad.write_bytes(b"not an image")
    paths.insert(5, bad)
    serial = list(encode_files(paths, size=8, mode="resize", workers=1))
    pooled = list(encode_files(paths, size=8, mode="resize", workers=2))
    assert [p for p, _, _ in serial] == paths == [p for p, _, _ in pooled]
    for (p, data, size), (_, data2, size2) in zip(serial, pooled):
        if p == bad:
            assert size is None and isinstance(data, str) and not data.startswith(str(p))
        else:
            assert size == (8, 8) and data == data2 and decode_image(data).shape[:2] == (8, 8)


def test_progress_bar_off_is_a_no_op():
    bar = progress_bar(3, "x", enabled=False)
    bar.update(2)
    bar.close()
