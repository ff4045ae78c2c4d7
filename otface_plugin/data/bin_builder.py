"""Build an LFW-style verification ``.bin`` in the recipe's format.

File format (what ``eval/verification.py:load_bin`` reads): a pickle of
``(bins, issame_list)``; ``bins`` is a list of ``2 * pairs`` encoded images (bytes, JPEG by
default), pair i being ``bins[2i]``, ``bins[2i+1]``; ``issame_list`` a list of bools.

Pairs are LFW-style: identities are split into ``folds`` disjoint groups and fold f holds
``pairs / folds`` consecutive pairs (half same-identity, half different-identity) built only from
its own identities. The recipe's 10-fold evaluation uses ``KFold(shuffle=False)`` over the pair
order, so its folds coincide with ours and test folds never share an identity with train folds.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from otface_plugin.data.atomic import atomic_outputs
from otface_plugin.data.encoding import encode_files, progress_bar
from otface_plugin.data.errors import DatasetLayoutError, ImageDecodeError
from otface_plugin.data.folders import IdentityFolder, scan_identity_folders

__all__ = ["BinBuildReport", "build_bin", "build_bin_from_pairs", "make_pairs",
           "max_balanced_pairs"]

Pair = Tuple[Path, Path, bool]


@dataclass
class BinBuildReport:
    path: Path
    pairs: int
    same: int
    folds: int
    num_identities: int
    num_images: int


def _fold_pairs(folders: Sequence[IdentityFolder], n_same: int, n_diff: int,
                rng: np.random.Generator) -> List[Pair]:
    """Distinct same and different pairs drawn from one fold's identities."""
    multi = [f for f in folders if len(f.files) >= 2]
    max_same = sum(len(f.files) * (len(f.files) - 1) // 2 for f in multi)
    if n_same > max_same:
        raise DatasetLayoutError(f"a fold with identities {[f.name for f in folders]} has only "
                                 f"{max_same} distinct same-identity pairs, {n_same} needed")
    seen = set()
    same: List[Pair] = []
    weights = np.array([len(f.files) for f in multi], dtype=float)
    while len(same) < n_same:
        f = multi[rng.choice(len(multi), p=weights / weights.sum())]
        i, j = sorted(rng.choice(len(f.files), size=2, replace=False))
        if (f.files[i], f.files[j]) not in seen:
            seen.add((f.files[i], f.files[j]))
            same.append((f.files[i], f.files[j], True))
    diff: List[Pair] = []
    tries = 0
    while len(diff) < n_diff:
        a, b = rng.choice(len(folders), size=2, replace=False)
        fa, fb = folders[a], folders[b]
        pa, pb = fa.files[rng.integers(len(fa.files))], fb.files[rng.integers(len(fb.files))]
        key = tuple(sorted((pa, pb)))
        tries += 1
        if key not in seen or tries > 100 * n_diff:  # tiny folds: allow repeats, not loops
            seen.add(key)
            diff.append((pa, pb, False))
    return same + diff


def _fold_groups(n: int, folds: int, seed: int) -> Tuple[np.random.Generator, List[np.ndarray]]:
    """The identity ordinals of each fold, and the generator that then draws the pairs."""
    rng = np.random.default_rng(seed)
    return rng, np.array_split(rng.permutation(n), folds)


def max_balanced_pairs(folders: Sequence[IdentityFolder], folds: int, seed: int = 0) -> int:
    """The most pairs ``make_pairs(folders, pairs, folds, seed)`` can draw: ``folds`` x 2 x the
    distinct same-identity pairs of the poorest fold (0 if a fold has no identity with 2 images)."""
    if folds < 1 or len(folders) < 2 * folds:
        return 0
    _, groups = _fold_groups(len(folders), folds, seed)
    same = min(sum(len(folders[i].files) * (len(folders[i].files) - 1) // 2 for i in g) for g in groups)
    return 2 * folds * same


def make_pairs(folders: Sequence[IdentityFolder], pairs: int, folds: int = 10, seed: int = 0
               ) -> List[List[Pair]]:
    """Pairs per fold: ``pairs`` in total, ``folds`` identity-disjoint folds, half same."""
    if folds < 1 or pairs < 2 * folds or pairs % (2 * folds):
        raise ValueError(f"--pairs ({pairs}) must be a positive multiple of 2 x folds "
                         f"({2 * folds}) so every fold is balanced same/different")
    if len(folders) < 2 * folds:
        raise DatasetLayoutError(f"{folds} identity-disjoint folds need at least {2 * folds} "
                                 f"identities (2 per fold for different pairs), got "
                                 f"{len(folders)}; lower --folds")
    rng, groups = _fold_groups(len(folders), folds, seed)
    per = pairs // folds
    out = []
    for g in groups:
        fold_folders = [folders[i] for i in sorted(g)]
        if not any(len(f.files) >= 2 for f in fold_folders):
            raise DatasetLayoutError("a fold has no identity with two images")
        out.append(_fold_pairs(fold_folders, per // 2, per // 2, rng))
    return out


def _write_bin(flat: Sequence[Pair], out_bin: os.PathLike, *, resize: Optional[int], resize_mode: str,
               quality: int, img_fmt: str, workers: int, overwrite: bool,
               progress: Optional[bool], inputs: Sequence[os.PathLike] = ()) -> Tuple[Path, int]:
    """Encode each image of the pairs once and write the recipe's ``.bin`` (a protocol-4 pickle of
    ``(bins, issame)``, two images per pair in order) atomically; returns (path, images encoded).
    ``inputs``: the other files the build read (the dataset's images, pairs file, identity
    list), never overwritten."""
    paths = sorted({p for a, b, _ in flat for p in (a, b)})
    out = Path(out_bin)
    # the output rules are checked before the encoding, not after minutes of it
    with atomic_outputs([out], overwrite=overwrite, inputs=[*paths, *inputs]) as tmp:
        encoded = {}
        bar = progress_bar(len(paths), "build-bin", progress)
        for path, data, _ in encode_files(paths, size=resize, mode=resize_mode, quality=quality,
                                          img_fmt=img_fmt, workers=workers):
            bar.update(1)
            if isinstance(data, str):
                raise ImageDecodeError(f"cannot read image {path}: {data}")
            encoded[path] = data
        bar.close()
        bins = [encoded[p] for a, b, _ in flat for p in (a, b)]
        issame = [bool(s) for _, _, s in flat]
        with open(tmp[out], "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
    return out, len(paths)


def build_bin(image_dir: os.PathLike, out_bin: os.PathLike, pairs: int, *, folds: int = 10,
              seed: int = 0, resize: Optional[int] = 112, resize_mode: str = "crop",
              quality: int = 95, img_fmt: str = ".jpg",
              identities: Optional[Sequence[str]] = None, workers: int = 1,
              overwrite: bool = False, progress: Optional[bool] = None,
              inputs: Sequence[os.PathLike] = ()) -> BinBuildReport:
    """Write ``out_bin`` atomically; any unreadable image aborts with its path. ``inputs``:
    other files the build reads (the identity list), never overwritten."""
    folders = scan_identity_folders(image_dir, identities)
    fold_pairs = make_pairs(folders, pairs, folds, seed)
    flat = [p for fold in fold_pairs for p in fold]
    out, num_images = _write_bin(flat, out_bin, resize=resize, resize_mode=resize_mode, quality=quality,
                                 img_fmt=img_fmt, workers=workers, overwrite=overwrite, progress=progress,
                                 inputs=[*(p for f in folders for p in f.files), *inputs])
    return BinBuildReport(out, len(flat), sum(s for _, _, s in flat), folds, len(folders), num_images)


def build_bin_from_pairs(image_dir: os.PathLike, out_bin: os.PathLike, pairs_file: os.PathLike, *,
                         folds: Optional[Sequence[int]] = None, resize: Optional[int] = 112,
                         resize_mode: str = "crop", quality: int = 95, img_fmt: str = ".jpg",
                         workers: int = 1, overwrite: bool = False,
                         progress: Optional[bool] = None) -> BinBuildReport:
    """The ``.bin`` of an LFW-format pairs file (e.g. LFW's own ``pairs.txt``), pairs in the file's
    order: the layout of InsightFace's ``lfw.bin``, so the recipe's ``val_targets: ['lfw']`` and its
    10-fold evaluation (consecutive folds) see the protocol's folds. ``folds``: 0-based folds to
    keep (default all). Images are ``image_dir/name/name_NNNN.jpg``; a missing one is an error
    naming the pairs-file line."""
    from otface_plugin.data.lfw_protocol import image_path, read_pairs_file

    root = Path(image_dir)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a directory")
    pf = read_pairs_file(pairs_file)
    chosen = list(range(len(pf.folds))) if folds is None else list(folds)
    flat: List[Pair] = []
    for p in pf.select(chosen):
        a, b = image_path(root, p.name1, p.num1), image_path(root, p.name2, p.num2)
        for path, name, num in ((a, p.name1, p.num1), (b, p.name2, p.num2)):
            if path is None:
                raise DatasetLayoutError(f"{pf.path} line {p.line}: image {num} of {name!r} not found "
                                         f"({root / name / f'{name}_{num:04d}.jpg'})")
        flat.append((a, b, p.same))
    out, num_images = _write_bin(flat, out_bin, resize=resize, resize_mode=resize_mode, quality=quality,
                                 img_fmt=img_fmt, workers=workers, overwrite=overwrite, progress=progress,
                                 inputs=[pairs_file])
    names = {n for a, b, _ in flat for n in (a.parent.name, b.parent.name)}
    return BinBuildReport(out, len(flat), sum(s for _, _, s in flat), len(chosen), len(names), num_images)
