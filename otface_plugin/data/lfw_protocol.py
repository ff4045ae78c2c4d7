"""LFW protocol files: ``pairs.txt`` (verification pairs by fold) and ``people.txt`` (people by set).

``pairs.txt`` (View 2): first line ``FOLDS N``; then, per fold, N same-person lines
``name<TAB>i<TAB>j`` followed by N different-person lines ``name1<TAB>i<TAB>name2<TAB>j``.
View 1 files (``pairsDevTrain.txt``) have a one-number header ``N`` (one fold). Image numbers are
1-based: ``George_W_Bush 10`` is ``George_W_Bush/George_W_Bush_0010.jpg``.

``people.txt``: first line the number of sets; then per set a count line and ``name<TAB>images``
lines. View 1 files (``peopleDevTrain.txt``) have a single count line (one set).

Every error names the file and the line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from otface_plugin.data.errors import DatasetLayoutError
from otface_plugin.data.folders import IMAGE_EXTENSIONS

__all__ = ["LfwPair", "PairsFile", "image_path", "parse_folds", "read_pairs_file", "read_people_file"]


@dataclass(frozen=True)
class LfwPair:
    """One pair: two (name, 1-based image number) and whether they are the same person."""

    name1: str
    num1: int
    name2: str
    num2: int
    same: bool
    line: int  # 1-based line in the file, for error messages


@dataclass
class PairsFile:
    """The parsed file: ``folds[k]`` are fold k's pairs in file order (same first, then different)."""

    path: Path
    per_fold: int  # same pairs per fold (= different pairs per fold)
    folds: List[List[LfwPair]]

    def select(self, folds: Optional[Sequence[int]] = None) -> List[LfwPair]:
        """Pairs of the given 0-based folds (all by default), in file order."""
        chosen = range(len(self.folds)) if folds is None else folds
        return [p for k in chosen for p in self.folds[k]]


def _lines(path: Path) -> List[Tuple[int, List[str]]]:
    """Non-blank lines split into fields (tabs, or any whitespace if a line has no tab)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetLayoutError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            out.append((n, [f.strip() for f in fields]))
    if not out:
        raise DatasetLayoutError(f"{path}: empty file")
    return out


def _int(path: Path, line: int, field: str, what: str) -> int:
    try:
        v = int(field)
    except ValueError:
        raise DatasetLayoutError(f"{path} line {line}: {what} {field!r} is not an integer") from None
    if v < 1:
        raise DatasetLayoutError(f"{path} line {line}: {what} {v} must be at least 1")
    return v


def read_pairs_file(path: os.PathLike) -> PairsFile:
    """Parse and check a pairs file (header counts, field counts, same/different order)."""
    path = Path(path)
    lines = _lines(path)
    n, head = lines[0]
    if len(head) == 2:
        folds, per = _int(path, n, head[0], "fold count"), _int(path, n, head[1], "pairs per fold")
    elif len(head) == 1:
        folds, per = 1, _int(path, n, head[0], "pairs count")
    else:
        raise DatasetLayoutError(f"{path} line {n}: header must be 'FOLDS PAIRS' (e.g. '10 300') or "
                                 f"'PAIRS', got {' '.join(head)!r}")
    body = lines[1:]
    if len(body) != 2 * folds * per:
        raise DatasetLayoutError(f"{path}: header says {folds} fold(s) x (2 x {per}) = {2 * folds * per} "
                                 f"pairs, the file has {len(body)} pair lines")
    out: List[List[LfwPair]] = []
    for k in range(folds):
        fold = []
        for i, (ln, f) in enumerate(body[2 * per * k: 2 * per * (k + 1)]):
            same = i < per
            if same and len(f) == 3:
                p = LfwPair(f[0], _int(path, ln, f[1], "image number"), f[0],
                            _int(path, ln, f[2], "image number"), True, ln)
            elif not same and len(f) == 4:
                p = LfwPair(f[0], _int(path, ln, f[1], "image number"), f[2],
                            _int(path, ln, f[3], "image number"), False, ln)
            else:
                want = "'name i j' (same person)" if same else "'name1 i name2 j' (different people)"
                raise DatasetLayoutError(f"{path} line {ln}: fold {k + 1} expects {want} here, got "
                                         f"{len(f)} field(s): {' '.join(f)!r}")
            # either would be scored as what it is not: one person as a different pair, or an
            # image against itself as a same pair
            if not same and p.name1 == p.name2:
                raise DatasetLayoutError(f"{path} line {ln}: a different-people line of fold {k + 1} "
                                         f"names {p.name1!r} twice")
            if same and p.num1 == p.num2:
                raise DatasetLayoutError(f"{path} line {ln}: a same-person line of fold {k + 1} pairs "
                                         f"image {p.num1} of {p.name1!r} with itself")
            fold.append(p)
        out.append(fold)
    return PairsFile(path, per, out)


def read_people_file(path: os.PathLike) -> List[List[Tuple[str, int]]]:
    """Parse a people file: per set, its (name, image count) entries in file order."""
    path = Path(path)
    lines = _lines(path)
    n, head = lines[0]
    if len(head) != 1:
        raise DatasetLayoutError(f"{path} line {n}: header must be the number of sets, got {' '.join(head)!r}")
    count = _int(path, n, head[0], "set count")
    rest = lines[1:]
    if len(rest) and len(rest[0][1]) == 2:  # View 1: the header is the people count of one set
        count, rest = 1, [(n, [head[0]])] + rest
    sets: List[List[Tuple[str, int]]] = []
    pos = 0
    for s in range(count):
        if pos >= len(rest):
            raise DatasetLayoutError(f"{path}: header says {count} sets, the file ends in set {s + 1}")
        ln, f = rest[pos]
        if len(f) != 1:
            raise DatasetLayoutError(f"{path} line {ln}: expected the people count of set {s + 1}, got {' '.join(f)!r}")
        k = _int(path, ln, f[0], "people count")
        entries = rest[pos + 1: pos + 1 + k]
        if len(entries) < k:
            raise DatasetLayoutError(f"{path}: set {s + 1} announces {k} people, the file ends after {len(entries)}")
        people = []
        for eln, ef in entries:
            if len(ef) != 2:
                raise DatasetLayoutError(f"{path} line {eln}: expected 'name images', got {' '.join(ef)!r}")
            people.append((ef[0], _int(path, eln, ef[1], "image count")))
        sets.append(people)
        pos += 1 + k
    if pos != len(rest):
        raise DatasetLayoutError(f"{path} line {rest[pos][0]}: text after the last of {count} sets")
    return sets


def parse_folds(spec: Optional[str], total: int) -> List[int]:
    """``"6-10"``, ``"1,3,5"`` or ``"2"`` (1-based, as the LFW files number them) -> 0-based folds."""
    if not spec:
        return list(range(total))
    out: List[int] = []
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"--folds {spec!r}: use a range like 6-10 or a list like 1,3,5") from None
        if not 1 <= lo <= hi <= total:
            raise ValueError(f"--folds {spec!r}: folds are numbered 1..{total} in this pairs file")
        out += [k - 1 for k in range(lo, hi + 1) if k - 1 not in out]
    return out


def image_path(root: Path, name: str, num: int) -> Optional[Path]:
    """``root/name/name_NNNN.jpg`` (or the same stem with another image extension), else None."""
    stem = f"{name}_{num:04d}"
    p = root / name / f"{stem}.jpg"
    if p.is_file():
        return p
    d = root / name
    if d.is_dir():
        for q in sorted(d.glob(stem + ".*")):
            if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file():
                return q
    return None
