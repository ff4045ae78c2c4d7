"""One-folder-per-identity image trees: scanning, subsets and identity-disjoint splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from otface_plugin.data.errors import DatasetLayoutError

__all__ = ["IdentityFolder", "read_identity_list", "scan_identity_folders", "split_identities",
           "load_rgb"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".pnm",
                              ".tif", ".tiff", ".webp", ".gif"})


@dataclass(frozen=True)
class IdentityFolder:
    """An identity: its folder name and its image files (sorted, so builds are reproducible)."""

    name: str
    files: Tuple[Path, ...]


def scan_identity_folders(root: os.PathLike, identities: Optional[Iterable[str]] = None,
                          skip_empty: bool = False) -> List[IdentityFolder]:
    """Identity folders under ``root`` sorted by name (their order is the class id).

    Files directly in ``root`` (READMEs, checksums) and files without an image extension are
    ignored. ``identities`` restricts the scan to those folder names (all must exist). An
    identity folder without images is an error unless ``skip_empty``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a directory")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if identities is not None:
        wanted = list(dict.fromkeys(identities))
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise DatasetLayoutError(
                f"{root}: identity folders not found: {', '.join(missing[:10])}"
                + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        names = sorted(wanted)
    out = []
    for name in names:
        files = tuple(sorted(p for p in (root / name).iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        if not files:
            if skip_empty:
                continue
            raise DatasetLayoutError(
                f"{root / name}: identity folder has no image files "
                f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))}); remove it, or pass "
                f"--skip-bad to skip it")
        out.append(IdentityFolder(name, files))
    if not out:
        raise DatasetLayoutError(f"{root}: no identity folders with images")
    return out


def read_identity_list(path: os.PathLike) -> List[str]:
    """Folder names, one per line (blank lines and '#' comments ignored)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
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
