"""Replace one file atomically: write a hidden temp file beside it, then rename it over it.

A crash or a kill leaves the old file or the new one, never half of one. This is the one
implementation of that step: the installer (patched upstream files), the identity-index cache,
the accuracy study's results and :mod:`otface_plugin.data.atomic` (several outputs under a
journal) all build on it. It lives outside ``otface_plugin.data`` so that the installer does not
import the data package (numpy, the RecordIO reader) to write a file.

Temp files are named ``.<name>.<pid>.<8 hex><suffix>`` beside the final path: hidden, unique,
on the same file system (so the rename is atomic), and the pid tells a later run whether the
writer is gone (see :func:`otface_plugin.data.atomic.recover_outputs`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

__all__ = ["TEMP_SUFFIX", "atomic_file", "atomic_write", "create_new", "discard", "temp_path"]

TEMP_SUFFIX = ".partial"


def temp_path(final: Union[str, os.PathLike], suffix: str = TEMP_SUFFIX) -> Path:
    """A fresh temp file name beside ``final`` (the file is not created)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def create_new(path: Union[str, os.PathLike]) -> int:
    """Create ``path`` (it must not exist) for writing; returns the open descriptor.

    Its mode is 0666 minus the umask, what ``open(path, "w")`` gives a new file (``mkstemp``
    would give 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(path, flags, 0o666)


def discard(path: Union[str, os.PathLike]) -> None:
    """Delete ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], *, mode: Optional[int] = None,
                suffix: str = TEMP_SUFFIX) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block exits normally; on an
    exception the temp file is deleted and ``path`` is left as it was.

    ``mode``: permission bits for the new file (e.g. the ``st_mode`` of the file it replaces);
    None keeps 0666 minus the umask. ``suffix`` ends the temp file's name, so a caller can find
    the temp files its killed runs left (the installer uses ``.otface-tmp``)."""
    tmp = temp_path(path, suffix)
    fd = create_new(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if mode is not None:
            os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, path)
    finally:
        discard(tmp)  # nothing left after a successful rename


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str], *,
                 mode: Optional[int] = None, suffix: str = TEMP_SUFFIX) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) atomically; see
    :func:`atomic_file` for ``mode`` and ``suffix``."""
    with atomic_file(path, mode=mode, suffix=suffix) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
