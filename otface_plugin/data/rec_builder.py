"""Build an InsightFace-style ``.rec``/``.idx`` from one folder per identity.

Layout written (what ``MXFaceDataset`` and :class:`IdentityIndex` read):
- record 0: header, ``flag=2``, label ``[N + 1, N + 1 + C]`` (first identity record, end);
- records 1..N: images, label = class id (float), ``id`` = record id, JPEG by default;
- records N+1..N+C: one per identity, ``flag=2``, label ``[first image, end image)``.
Class ids are the identity folders in sorted name order, renumbered densely when
``skip_bad`` drops an identity with no readable image.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from otface_plugin.data.atomic import atomic_outputs
from otface_plugin.data.encoding import encode_files, progress_bar
from otface_plugin.data.errors import DatasetLayoutError, ImageDecodeError
from otface_plugin.data.folders import scan_identity_folders
from otface_plugin.data.recordio import IRHeader, MXIndexedRecordIO, frame_record, pack

__all__ = ["RecBuildReport", "build_rec", "resolve_rec_outputs"]

log = logging.getLogger(__name__)


@dataclass
class RecBuildReport:
    rec: Path
    idx: Path
    property_file: Optional[Path]
    num_identities: int
    num_images: int
    image_size: Optional[Tuple[int, int]]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    identities: List[str] = field(default_factory=list)


def resolve_rec_outputs(out_prefix: os.PathLike) -> Tuple[Path, Path, Optional[Path]]:
    """(rec, idx, property) paths. An existing directory, or a path ending in a separator,
    means the recipe's layout ``DIR/train.rec``, ``DIR/train.idx``, ``DIR/property`` (so
    ``cfg.rec = DIR`` works); anything else is a prefix: ``PREFIX.rec``, ``PREFIX.idx``."""
    s = os.fspath(out_prefix)
    p = Path(s)
    if p.is_dir() or s.endswith(("/", os.sep)):
        return p / "train.rec", p / "train.idx", p / "property"
    return Path(s + ".rec"), Path(s + ".idx"), None


def _header_record(first: int, end: int) -> bytes:
    return pack(IRHeader(0, [float(first), float(end)], 0, 0), b"")


def build_rec(image_dir: os.PathLike, out_prefix: os.PathLike, *, workers: int = 1,
              resize: Optional[int] = 112, resize_mode: str = "crop", skip_bad: bool = False,
              quality: int = 95, img_fmt: str = ".jpg",
              identities: Optional[Sequence[str]] = None, overwrite: bool = False,
              progress: Optional[bool] = None, recursive: bool = False,
              inputs: Sequence[os.PathLike] = ()) -> RecBuildReport:
    """Pack ``image_dir/<identity>/<image>`` into a .rec/.idx (see module docstring).

    Nothing is written unless the build succeeds: outputs are temp files committed at the end
    (all or nothing, also when killed; see :mod:`otface_plugin.data.atomic`), the ``.rec``
    being the commit marker. An unreadable image aborts with its path unless ``skip_bad`` (then
    it is reported). Images in sub-folders of an identity folder count with ``recursive``;
    otherwise a warning says how many are left out. ``inputs``: other files the build reads
    (the identity list); like the images, they are never overwritten, ``overwrite`` or not.
    """
    rec_path, idx_path, prop_path = resolve_rec_outputs(out_prefix)
    folders = scan_identity_folders(image_dir, identities, skip_empty=skip_bad,
                                    recursive=recursive)
    files = [f for folder in folders for f in folder.files]
    owner = [i for i, folder in enumerate(folders) for _ in folder.files]
    finals = [rec_path, idx_path] + ([prop_path] if prop_path else [])
    skipped: List[Tuple[str, str]] = []
    with atomic_outputs(finals, overwrite=overwrite, inputs=[*files, *inputs]) as tmp:
        writer = MXIndexedRecordIO(tmp[idx_path], tmp[rec_path], "w")
        try:
            # Record 0 needs the final counts; its framed size does not depend on the values
            # (flag=2, two float32), so write a placeholder now and overwrite it in place.
            writer.write_idx(0, _header_record(0, 0))
            class_of: dict = {}
            ranges: List[Tuple[int, int]] = []
            names: List[str] = []
            size = None
            key = 1
            bar = progress_bar(len(files), "build-rec", progress)
            for (path, data, wh), ident in zip(
                    encode_files(files, size=resize, mode=resize_mode, quality=quality,
                                 img_fmt=img_fmt, workers=workers), owner):
                bar.update(1)
                if isinstance(data, str):
                    if not skip_bad:
                        raise ImageDecodeError(f"cannot read image {path}: {data} (pass "
                                               f"--skip-bad to skip unreadable images)")
                    skipped.append((str(path), data))
                    log.warning("skipping unreadable image %s: %s", path, data)
                    continue
                if ident not in class_of:
                    class_of[ident] = len(class_of)
                    ranges.append((key, key))
                    names.append(folders[ident].name)
                c = class_of[ident]
                writer.write_idx(key, pack(IRHeader(0, float(c), key, 0), data))
                ranges[c] = (ranges[c][0], key + 1)
                size = wh if size is None or size == wh else (-1, -1)
                key += 1
            bar.close()
            n_img = key - 1
            if n_img == 0:
                raise DatasetLayoutError(f"{image_dir}: no readable images")
            first = key
            for a, b in ranges:
                writer.write_idx(key, _header_record(a, b))
                key += 1
        finally:
            writer.close()
        header = frame_record(_header_record(first, key))
        with open(tmp[rec_path], "r+b") as f:
            assert len(header) == 40
            f.write(header)
        if max(first, key) >= 1 << 24:
            log.warning("%d records: InsightFace's float32 header ranges are rounded above "
                        "2**24; readers fall back to a label scan", key)
        image_size = None if size in (None, (-1, -1)) else size
        if prop_path:
            w, h = image_size or (resize or 0, resize or 0)
            tmp[prop_path].write_text(f"{len(ranges)},{h},{w}\n")
    return RecBuildReport(rec_path, idx_path, prop_path, len(ranges), n_img, image_size,
                          skipped, names)
