"""Encode and decode record images with Pillow (no OpenCV or mxnet needed).

Two decoding conventions exist in the recipe's world and both are offered:
- :func:`decode_image` mirrors ``mx.image.imdecode(buf).asnumpy()`` (what ``MXFaceDataset`` and
  ``eval/verification.py`` use): RGB, always 3 channels (or HxWx1 for ``flag=0``);
- :func:`decode_image_cv2_style` mirrors ``cv2.imdecode(buf, iscolor)`` (what
  ``mx.recordio.unpack_img`` uses): BGR, channels as stored for ``iscolor=-1``.

Pillow is used for both encoding and decoding so the bytes we write do not depend on whether
OpenCV happens to be installed. Where Pillow's defaults differ from OpenCV's 8-bit colour read
(``IMREAD_COLOR``, what im2rec's ``cv2.imread`` and mxnet's decoder use), OpenCV is followed:
16-bit grayscale is reduced to its high byte (Pillow's ``convert`` saturates it at 255), and
input files are turned upright by their EXIF orientation (Pillow ignores it).
"""
from __future__ import annotations

import io
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from otface_plugin.data.errors import ImageDecodeError

__all__ = ["decode_image", "decode_image_cv2_style", "encode_image", "open_image"]

_JPEG = {".JPG", ".JPEG"}
_PNG = {".PNG"}


def _check_order(channel_order: str) -> bool:
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    return channel_order == "bgr"


def encode_image(img: Union[np.ndarray, Image.Image], img_fmt: str = ".jpg", quality: int = 95,
                 channel_order: str = "rgb") -> bytes:
    """Encode an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array (or a PIL image) as JPEG or PNG bytes.

    ``quality``: JPEG quality 1-100; for PNG the zlib level, capped at 9 (cv2 semantics).
    """
    bgr = _check_order(channel_order)
    if isinstance(img, Image.Image):
        pil = img
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            if bgr:
                arr = np.concatenate([arr[:, :, 2::-1], arr[:, :, 3:]], axis=2)
        elif arr.ndim != 2:
            raise ValueError(f"expected an HxW or HxWxC image (C in 1, 3, 4), got {arr.shape}")
        pil = Image.fromarray(np.ascontiguousarray(arr))
    fmt = img_fmt.upper() if img_fmt.startswith(".") else "." + img_fmt.upper()
    out = io.BytesIO()
    if fmt in _JPEG:
        if pil.mode not in ("L", "RGB"):
            pil = pil.convert("RGB")
        pil.save(out, format="JPEG", quality=int(quality))
    elif fmt in _PNG:
        pil.save(out, format="PNG", compress_level=min(max(int(quality), 0), 9))
    else:
        raise ValueError(f"unsupported image format {img_fmt!r}; use '.jpg' or '.png'")
    return out.getvalue()


def _open(buf: bytes) -> Image.Image:
    if len(buf) == 0:
        raise ImageDecodeError("empty image payload")
    try:
        pil = Image.open(io.BytesIO(buf))
        pil.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        head = bytes(buf[:8]).hex()
        raise ImageDecodeError(
            f"payload of {len(buf)} bytes is not a decodable image (first bytes {head}): {e}"
        ) from None
    return pil


_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 2-8 a flip and/or rotation


def _is_16bit(pil: Image.Image) -> bool:
    """16-bit grayscale (older Pillows open a 16-bit grayscale PNG as mode "I"). Pillow opens
    16-bit colour PNGs as their high bytes already, as OpenCV does."""
    return pil.mode in _SIXTEEN_BIT or (pil.mode == "I" and pil.format == "PNG")


def _high_byte(pil: Image.Image) -> Image.Image:
    """16-bit grayscale as OpenCV reads it into 8 bits: value // 256."""
    arr = np.asarray(pil).astype(np.int64) >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _upright(pil: Image.Image) -> Image.Image:
    """The image as displayed: its EXIF orientation applied, as OpenCV's colour and grayscale
    reads do (JPEG and PNG alike)."""
    try:
        orientation = pil.getexif().get(_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: OpenCV then reads the pixels as stored
        return pil
    return ImageOps.exif_transpose(pil) if orientation in range(2, 9) else pil


def _as_opencv_reads(pil: Image.Image) -> Image.Image:
    """What OpenCV's 8-bit colour or grayscale read gives: upright, 8 bits per channel."""
    sixteen = _is_16bit(pil)  # before the transpose, which drops ``format``
    pil = _upright(pil)
    return _high_byte(pil) if sixteen else pil


def open_image(path: str) -> Image.Image:
    """Open an image file fully decoded, as ``cv2.imread(path, IMREAD_COLOR)`` sees it: upright
    by its EXIF orientation and 8 bits per channel (see the module docstring); errors name the
    path."""
    try:
        with open(path, "rb") as f:
            return _as_opencv_reads(_open(f.read()))
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{path}: {e}") from None


def decode_image(buf: bytes, flag: int = 1, to_rgb: bool = True) -> np.ndarray:
    """Like ``mx.image.imdecode(buf, flag, to_rgb).asnumpy()``: uint8 HxWx3 (RGB unless
    ``to_rgb=False``) for ``flag=1``, HxWx1 grayscale for ``flag=0``; 16-bit images reduced to
    their high byte, as mxnet's OpenCV does. The EXIF orientation is not applied: mxnet
    1.9.1's ``imdecode`` ignores it (tests/mxnet_compat checks both), and records written by
    im2rec or ``build-rec`` are re-encoded upright without EXIF."""
    pil = _open(buf)
    if _is_16bit(pil):
        pil = _high_byte(pil)
    if flag == 0:
        return np.asarray(pil.convert("L"))[:, :, None]
    arr = np.asarray(pil.convert("RGB"))
    return arr if to_rgb else arr[:, :, ::-1].copy()


def decode_image_cv2_style(buf: bytes, iscolor: int = -1, channel_order: str = "bgr"
                           ) -> np.ndarray:
    """Like ``cv2.imdecode(buf, iscolor)``: -1 keeps the stored channels (HxW for grayscale,
    HxWx3, HxWx4 with alpha), 0 gives HxW grayscale, 1 gives HxWx3. BGR unless
    ``channel_order="rgb"``. Like OpenCV, 0 and 1 apply the EXIF orientation and reduce 16-bit
    images to their high byte; -1 gives the pixels as stored."""
    bgr = _check_order(channel_order)
    pil = _open(buf)
    if iscolor >= 0:
        pil = _as_opencv_reads(pil)
    if iscolor == 0 or (iscolor < 0 and pil.mode in ("1", "L")):
        return np.asarray(pil.convert("L"))
    if iscolor < 0 and pil.mode in ("I;16", "I;16B", "I"):
        return np.asarray(pil)  # 16-bit PNG: cv2 keeps the depth too
    mode = "RGBA" if iscolor < 0 and ("A" in pil.mode or "transparency" in pil.info) else "RGB"
    arr = np.asarray(pil.convert(mode))
    if bgr:
        arr = np.concatenate([arr[:, :, 2::-1], arr[:, :, 3:]], axis=2)
    return np.ascontiguousarray(arr)
