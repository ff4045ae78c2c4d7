"""The ``mx`` that the patched recipe's ``dataset.py`` and ``eval/verification.py`` import.

The recipe reads its data through five mxnet calls: ``mx.recordio.MXIndexedRecordIO`` and
``mx.recordio.unpack`` (``MXFaceDataset``), ``mx.image.imdecode``, ``mx.image.resize_short``,
``mx.nd.transpose`` / ``mx.ndarray.flip`` and ``.asnumpy()`` (``load_bin``). mxnet 1.9.1, its
last release, imports only with numpy <= 1.23.5 (or with the aliases numpy 1.24 removed) and on
Python <= 3.11 (it imports distutils), so on a current stack the recipe cannot read a ``.rec``.

``OTFACE_RECORDIO`` chooses:
- ``auto`` (default): the real mxnet when it imports (the recipe then behaves exactly as before),
  else the plugin's reader;
- ``mxnet``: the real mxnet, an error if it does not import;
- ``plugin``: the plugin's reader (:mod:`otface_plugin.data.recordio` and
  :mod:`otface_plugin.data.imagecodec`): the same records, labels and decoded RGB pixels as mxnet
  (tested against mxnet 1.9.1 in its own environment), without mxnet.

Only the calls above exist in the plugin's ``mx``; any other attribute is an error that says so.
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Any, Tuple

import numpy as np

__all__ = ["ENV", "CHOICES", "backend", "backend_choice", "load_mx", "mx"]

ENV = "OTFACE_RECORDIO"
CHOICES = ("auto", "mxnet", "plugin")


def backend_choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: choose one of {', '.join(CHOICES)}")
    return value


def _real_mxnet():
    # mxnet 1.9.1 still uses np.bool/np.int/np.float, removed in numpy 1.24: restore them as the
    # builtins they aliased, only on the way to importing mxnet
    for name, builtin in (("bool", bool), ("int", int), ("float", float)):
        if name not in np.__dict__:
            setattr(np, name, builtin)
    import mxnet

    return mxnet


class NDArray(np.ndarray):
    """A numpy array with mxnet's ``asnumpy()`` (a contiguous copy, as mxnet returns)."""

    def asnumpy(self) -> np.ndarray:
        return np.array(self, copy=True, order="C").view(np.ndarray)


def _nd(a: np.ndarray) -> NDArray:
    return np.asarray(a).view(NDArray)


def imdecode(buf: Any, flag: int = 1, to_rgb: bool = True, **_: Any) -> NDArray:
    """``mx.image.imdecode``: HxWx3 uint8, RGB unless ``to_rgb=False`` (HxWx1 for ``flag=0``)."""
    from otface_plugin.data.imagecodec import decode_image

    data = buf.tobytes() if isinstance(buf, np.ndarray) else bytes(buf)
    return _nd(decode_image(data, flag=flag, to_rgb=to_rgb))


def _short_side(h: int, w: int, size: int) -> Tuple[int, int]:
    return (size * h // w, size) if h > w else (size, size * w // h)


def resize_short(src: Any, size: int, interp: int = 2) -> NDArray:
    """``mx.image.resize_short``: the shorter side to ``size``, bicubic (mxnet's ``interp=2``)
    through OpenCV as mxnet does when cv2 is installed, else Pillow's bicubic (pixels may then
    differ from mxnet's by rounding)."""
    img = np.asarray(src)
    h, w = img.shape[:2]
    new_h, new_w = _short_side(h, w, int(size))
    try:
        import cv2

        modes = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR, 2: cv2.INTER_CUBIC, 3: cv2.INTER_AREA,
                 4: cv2.INTER_LANCZOS4}
        out = cv2.resize(img, (new_w, new_h), interpolation=modes.get(int(interp), cv2.INTER_CUBIC))
        if out.ndim == 2 and img.ndim == 3:
            out = out[:, :, None]
    except ImportError:
        from PIL import Image

        modes = {0: Image.NEAREST, 1: Image.BILINEAR, 2: Image.BICUBIC, 3: Image.BOX, 4: Image.LANCZOS}
        channels = img.shape[2] if img.ndim == 3 else 0
        pil = Image.fromarray(img[:, :, 0] if channels == 1 else img)
        out = np.asarray(pil.resize((new_w, new_h), modes.get(int(interp), Image.BICUBIC)))
        if channels == 1:
            out = out[:, :, None]
    return _nd(out)


def transpose(data: Any, axes: Tuple[int, ...] = ()) -> NDArray:
    return _nd(np.transpose(np.asarray(data), axes or None))


def flip(data: Any, axis: int) -> NDArray:
    return _nd(np.flip(np.asarray(data), axis))


class _Namespace(types.SimpleNamespace):
    """A module-like namespace; a name the recipe's data path never uses is a clear error."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        where = f"mx.{self._path}.{name}" if self._path else f"mx.{name}"
        raise AttributeError(f"{where} is not part of otface-plugin's mxnet-free reader (it covers what dataset.py and "
                             f"eval/verification.py read data with); install mxnet 1.9.1 or set {ENV}=mxnet")


def _plugin_mx() -> _Namespace:
    from otface_plugin.data import recordio

    nd = _Namespace(_path="ndarray", transpose=transpose, flip=flip, NDArray=NDArray)
    return _Namespace(
        _path="",
        __name__="otface_plugin.arcface_torch.mxnet_compat.mx",
        recordio=_Namespace(_path="recordio", MXIndexedRecordIO=recordio.MXIndexedRecordIO,
                            MXRecordIO=recordio.MXRecordIO, unpack=recordio.unpack, pack=recordio.pack,
                            IRHeader=recordio.IRHeader),
        image=_Namespace(_path="image", imdecode=imdecode, resize_short=resize_short),
        ndarray=nd,
        nd=nd,
    )


def load_mx(choice: str | None = None) -> Tuple[Any, str]:
    """(mx, "mxnet" or "plugin"): the real mxnet or the plugin's ``mx``, as ``OTFACE_RECORDIO``
    (or ``choice``) says."""
    choice = backend_choice() if choice is None else choice
    if choice == "plugin":
        return _plugin_mx(), "plugin"
    try:
        return _real_mxnet(), "mxnet"
    except (ImportError, AttributeError, OSError) as exc:  # OSError/AttributeError: a broken mxnet install
        if choice == "mxnet":
            raise ImportError(f"{ENV}=mxnet, but mxnet does not import: {exc}") from exc
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == "mxnet"):  # installed, but broken
            warnings.warn(f"mxnet is installed but does not import ({type(exc).__name__}: {exc}); reading "
                          f"RecordIO with otface-plugin's reader (set {ENV}=plugin to silence this)", RuntimeWarning)
        return _plugin_mx(), "plugin"


mx, backend = load_mx()
