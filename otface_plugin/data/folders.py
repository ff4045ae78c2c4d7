"""One-folder-per-identity image trees: scanning, subsets and identity-disjoint splits."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from otface_plugin.data.errors import DatasetLayoutError

__all__ = ["IdentityFolder", "format_identity_list", "identity_list_line", "read_identity_list",
           "scan_identity_folders", "split_identities", "load_rgb", "write_identity_list"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".pnm",
                              ".tif", ".tiff", ".webp", ".gif"})


@dataclass(frozen=True)
class IdentityFolder:
    """An identity: its folder name and its image files (sorted, so builds are reproducible)."""

    name: str
    files: Tuple[Path, ...]


def _images_in(folder: Path, recursive: bool) -> Tuple[List[Path], List[Path]]:
    """(image files of ``folder``, images in its sub-folders): the sub-folder images are
    included in the first list when ``recursive``, else returned separately so callers can
    say that they are left out. Hidden sub-folders are skipped, like hidden identity folders."""
    files: List[Path] = []
    nested: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found = [Path(dirpath, f) for f in filenames
                 if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if dirpath == os.fspath(folder) or recursive:
            files.extend(found)
        else:
            nested.extend(found)
    return sorted(files), sorted(nested)


def scan_identity_folders(root: os.PathLike, identities: Optional[Iterable[str]] = None,
                          skip_empty: bool = False, recursive: bool = False
                          ) -> List[IdentityFolder]:
    """Identity folders under ``root`` sorted by name (their order is the class id).

    Files directly in ``root`` (READMEs, checksums) and files without an image extension are
    ignored. ``identities`` restricts the scan to those folder names (all must exist). An
    identity folder without images is an error unless ``skip_empty``. Images in sub-folders
    of an identity folder belong to it with ``recursive``; otherwise they are left out and a
    warning says how many.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a directory")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if identities is not None:
        wanted = list(dict.fromkeys(identities))
        present = set(names)
        missing = [n for n in wanted if n not in present]
        if missing:
            hidden = " (folders whose names start with '.' are not identities)" if any(
                n.startswith(".") for n in missing) else ""
            raise DatasetLayoutError(
                f"{root}: identity folders not found: {', '.join(map(quote_name, missing[:10]))}"
                + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "") + hidden)
        names = sorted(wanted)
    out = []
    left_out: List[Path] = []
    for name in names:
        files, nested = _images_in(root / name, recursive)
        left_out.extend(nested)
        if not files:
            if skip_empty:
                continue
            raise DatasetLayoutError(
                f"{root / name}: identity folder has no image files "
                f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
                + (f" directly in it, {len(nested)} in sub-folders (--recursive includes them)"
                   if nested else "") + "; remove it, or pass --skip-bad to skip it")
        out.append(IdentityFolder(name, tuple(files)))
    if left_out:
        log.warning("%s: %d images in sub-folders of identity folders are left out (first: %s); "
                    "`otface-data build-rec --recursive` includes them", root, len(left_out),
                    left_out[0])
    if not out:
        raise DatasetLayoutError(f"{root}: no identity folders with images")
    return out


# Identity lists (what `split` writes and `--identities-from` reads), one name per line:
# - a line whose first non-blank character is '"' is a JSON string literal: the name, exactly;
# - otherwise blank lines and lines starting with '#' are skipped, and the line with leading and
#   trailing whitespace removed is the name, verbatim ('#' inside a name is part of it).
# The writer quotes every name the plain form would change, so any folder name round-trips
# (surrogate escapes of undecodable bytes included); other names are written as they are,
# so lists of ordinary names stay plain text that `str.split()` and hand edits understand.


def _plain_ok(name: str) -> bool:
    """True when the plain form reads back as ``name``."""
    return (name.isprintable() and name == name.strip() and not name.startswith(("#", '"')))


def identity_list_line(name: str) -> str:
    """One list line (without newline) that :func:`read_identity_list` reads back as ``name``."""
    return name if _plain_ok(name) else json.dumps(name)  # ASCII: \uXXXX for the rest


def format_identity_list(names: Iterable[str]) -> str:
    """A whole list file's text."""
    return "".join(identity_list_line(n) + "\n" for n in names)


def write_identity_list(path: os.PathLike, names: Iterable[str]) -> None:
    """Write a list file (UTF-8; surrogate escapes of undecodable folder names written back as
    their original bytes, as :func:`read_identity_list` reads them)."""
    Path(path).write_text(format_identity_list(names), encoding="utf-8", errors="surrogateescape")


def quote_name(name: str) -> str:
    """A name as printed in messages: the list form, quoted so spaces and '#' show."""
    return json.dumps(name, ensure_ascii=not name.isprintable())


def read_identity_list(path: os.PathLike) -> List[str]:
    """Folder names of a list file (format above). Errors name the file and line."""
    names = []
    text = Path(path).read_text(encoding="utf-8-sig", errors="surrogateescape")
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith('"'):
            try:
                name = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetLayoutError(
                    f"{path}: line {lineno}: a line starting with '\"' must be one JSON string "
                    f"(the quoted folder name): {e.msg}") from None
            if not isinstance(name, str) or not name:
                raise DatasetLayoutError(f"{path}: line {lineno}: not a folder name: {line}")
        else:
            name = line
        names.append(name)
    if not names:
        raise DatasetLayoutError(f"{path}: empty identity list")
    return names


def split_identities(names: Sequence[str], holdout_fraction: float, seed: int = 0
                     ) -> Tuple[List[str], List[str]]:
    """Deterministic identity-disjoint (train, holdout) split of folder names."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    names = sorted(names)
    n_hold = int(round(len(names) * holdout_fraction))
    if not 0 < n_hold < len(names):
        raise ValueError(f"a {holdout_fraction} holdout of {len(names)} identities leaves a "
                         f"side empty")
    perm = np.random.default_rng(seed).permutation(len(names))
    hold = sorted(names[i] for i in perm[:n_hold])
    train = sorted(names[i] for i in perm[n_hold:])
    return train, hold


def load_rgb(path: os.PathLike, size: Optional[int] = 112, mode: str = "crop") -> Image.Image:
    """Open an image as 3-channel RGB (grayscale is replicated), optionally square-resized.

    ``mode="crop"`` centre-crops to a square first (keeps the face's aspect ratio);
    ``"stretch"`` resizes directly. Raises ImageDecodeError naming the path.
    """
    from otface_plugin.data.imagecodec import open_image

    img = open_image(os.fspath(path)).convert("RGB")
    if size and img.size != (size, size):
        if mode == "crop":
            w, h = img.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        elif mode != "stretch":
            raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
        img = img.resize((size, size), Image.BICUBIC)
    return img
