"""Parallel, ordered image loading + encoding shared by the .rec and .bin builders."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

from otface_plugin.data.errors import ImageDecodeError
from otface_plugin.data.folders import load_rgb
from otface_plugin.data.imagecodec import encode_image

__all__ = ["encode_files", "progress_bar"]

Result = Tuple[Path, Union[bytes, str], Optional[Tuple[int, int]]]


def _encode_one(path: Path, size: Optional[int], mode: str, quality: int, img_fmt: str
                ) -> Result:
    """(path, encoded bytes, (w, h)) or (path, error message, None); never raises, so one bad
    file does not kill a worker pool."""
    try:
        img = load_rgb(path, size, mode)
        return path, encode_image(img, img_fmt=img_fmt, quality=quality), img.size
    except (ImageDecodeError, OSError, ValueError) as e:
        msg = str(e)  # callers add the path themselves
        return path, msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg, None


def _worker_signals() -> None:
    """Workers leave SIGINT/SIGTERM to the parent, which stops the pool and cleans up (they
    inherit the CLI's SIGTERM handler through fork otherwise)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def encode_files(paths: Sequence[Path], *, size: Optional[int] = 112, mode: str = "crop",
                 quality: int = 95, img_fmt: str = ".jpg", workers: int = 1
                 ) -> Iterator[Result]:
    """Yield one result per path, in input order, using ``workers`` processes."""
    fn = partial(_encode_one, size=size, mode=mode, quality=quality, img_fmt=img_fmt)
    if workers <= 1 or len(paths) < 2 * workers:
        yield from map(fn, paths)
        return
    # fork keeps start-up cheap on Linux; spawn elsewhere (macOS/Windows defaults)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else None)
    with ctx.Pool(workers, initializer=_worker_signals) as pool:
        yield from pool.imap(fn, paths, chunksize=max(1, min(64, len(paths) // (workers * 8))))


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None):
    """tqdm bar on a terminal, a no-op object otherwise (logs and CI stay clean)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("OTFACE_NO_PROGRESS")
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class _NullBar:
    """Stands in for tqdm when no bar is shown (and tqdm may be absent)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
