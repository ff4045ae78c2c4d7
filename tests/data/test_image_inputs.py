"""Input images are read as OpenCV's 8-bit colour read (im2rec's ``cv2.imread``) reads them: a
16-bit PNG keeps its range (value // 256, not saturated at 255) and a photo with an EXIF
orientation is stored upright. Pixels are compared with numpy's expectation, and with OpenCV
where it is installed."""
import numpy as np
import pytest
from PIL import Image

from otface_plugin.data import MXIndexedRecordIO
from otface_plugin.data.dataset import read_image_record
from otface_plugin.data.imagecodec import decode_image, decode_image_cv2_style, open_image
from otface_plugin.data.rec_builder import build_rec

try:
    import cv2
except ImportError:  # the comparison with OpenCV is extra; numpy's expectation is always checked
    cv2 = None

ORIENTATION = 0x0112


def stored_pixels(tmp_path, make_image):
    """The RGB pixels that `build-rec` stores for the one image ``make_image(path)`` writes."""
    d = tmp_path / "faces" / "id0"
    d.mkdir(parents=True)
    src = make_image(d)
    out = tmp_path / "ds"
    out.mkdir()
    build_rec(tmp_path / "faces", out, resize=None, img_fmt=".png")  # lossless, size kept
    reader = MXIndexedRecordIO(out / "train.idx", out / "train.rec", "r")
    try:
        return src, read_image_record(reader, 1)[1]
    finally:
        reader.close()


def opencv_rgb(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


def ramp16():
    """Every 16-bit value region: 0, 255 (all below 256), mid-range and 65535."""
    return (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)


def test_16bit_png_keeps_its_range(tmp_path):
    a = ramp16()

    def write(d):
        Image.fromarray(a).save(d / "g16.png")  # mode I;16: a 16-bit grayscale PNG
        return d / "g16.png"

    src, got = stored_pixels(tmp_path, write)
    want = np.repeat((a >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    assert got.shape == (16, 16, 3) and got.max() == 255 and len(np.unique(got)) == 256
    np.testing.assert_array_equal(got, want)
    if cv2 is not None:
        np.testing.assert_array_equal(got, opencv_rgb(src))


def test_16bit_png_payload_decodes_like_opencv(tmp_path):
    a = ramp16()
    Image.fromarray(a).save(tmp_path / "g16.png")
    buf = (tmp_path / "g16.png").read_bytes()
    want = (a >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(buf), np.repeat(want[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(decode_image(buf, flag=0)[:, :, 0], want)
    np.testing.assert_array_equal(decode_image_cv2_style(buf, 0), want)
    assert decode_image_cv2_style(buf, -1).max() == a.max()  # unchanged: the stored depth
    if cv2 is not None:
        arr = np.frombuffer(buf, np.uint8)
        for flag in (0, 1, -1):
            np.testing.assert_array_equal(decode_image_cv2_style(buf, flag),
                                          cv2.imdecode(arr, flag))


def scene():
    """16 x 32 RGB, four 8 x 16 blocks (JPEG's own block size): every corner a different
    colour, so any flip or turn shows."""
    img = np.zeros((16, 32, 3), np.uint8)
    img[:8, :16] = (250, 10, 10)
    img[:8, 16:] = (10, 250, 10)
    img[8:, :16] = (10, 10, 250)
    img[8:, 16:] = (250, 250, 10)
    return img


# EXIF orientation -> how the stored pixels must look (what a viewer, and OpenCV, display)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # the camera was turned: stored sideways, shown upright
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def with_orientation(d, orientation, fmt):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = d / f"o{orientation}{fmt}"
    Image.fromarray(scene()).save(path, exif=exif.tobytes(),
                                  **({"quality": 100, "subsampling": 0} if fmt == ".jpg"
                                     else {}))
    return path


def test_jpeg_with_exif_orientation_6_is_stored_upright(tmp_path):
    src, got = stored_pixels(tmp_path, lambda d: with_orientation(d, 6, ".jpg"))
    want = UPRIGHT[6](scene())
    assert got.shape == want.shape == (32, 16, 3)  # not the sideways 16 x 32
    assert np.abs(got.astype(int) - want).max() <= 8  # JPEG's loss on flat 8 x 8 blocks
    if cv2 is not None:
        assert np.abs(got.astype(int) - opencv_rgb(src)).max() <= 2  # two libjpeg builds


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_exif_orientation(tmp_path, orientation):
    path = with_orientation(tmp_path, orientation, ".png")  # lossless: exact pixels
    got = np.asarray(open_image(str(path)).convert("RGB"))
    np.testing.assert_array_equal(got, UPRIGHT[orientation](scene()))
    buf = path.read_bytes()
    np.testing.assert_array_equal(decode_image_cv2_style(buf, 1, "rgb"), got)
    assert decode_image_cv2_style(buf, -1, "rgb").shape == scene().shape  # as stored
    if cv2 is not None:
        np.testing.assert_array_equal(got, opencv_rgb(path))
