"""Identity -> images index of an InsightFace ``.rec``, sized for WebFace42M.

Two kinds of numbers are involved, and the index keeps them apart:

- **dataset position** ``i``: the index the recipe's ``MXFaceDataset.__getitem__`` receives and
  what samplers must yield. ``MXFaceDataset`` maps it to a record with ``imgidx[i]``:
  ``imgidx = range(1, header0.label[0])`` when record 0 is an InsightFace header, else the
  ``.idx`` keys in file order.
- **record id**: the key in ``train.idx`` (``imgidx[i]``), see :meth:`IdentityIndex.record_ids`.

Identities are stored CSR-style: ``offsets`` (C+1) into ``order`` (N dataset positions grouped by
identity). For a header-built index ``order`` is implicit (identity ranges are contiguous), so
memory is O(identities); a label-scanned index holds a few int64 arrays of N entries, never a
Python object per image.

Building:
- from record 0's identity ranges (InsightFace convention): one vectorised read of the identity
  records, seconds for 2M identities;
- otherwise by scanning every image record's label once (vectorised over a memory map of the
  ``.rec``), cached in ``<rec>.otface-idx.npz`` (or under ``~/.cache/otface-plugin`` when the
  dataset directory is read-only) together with the ``.rec``/``.idx`` sizes, mtimes and a digest
  of the ``.idx``; a cache that is stale or belongs to another file is rebuilt.

float32 caveat: RecordIO labels are float32, exact only up to 2**24 = 16,777,216. When the header
ranges go beyond that (WebFace42M has 42M images) they are rounded, so the index falls back to the
exact label scan (cached, paid once) and says why.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from otface_plugin.atomicfile import atomic_file
from otface_plugin.data.errors import RecordIOError
from otface_plugin.data.layout import FLOAT32_EXACT, parse_header
from otface_plugin.data.recordio import (IR_FLOATS_AT, IR_HEADER_SIZE, IR_LABEL_AT, MAGIC, MXIndexedRecordIO,
                                         frame_field, frame_fields, unpack)

__all__ = ["IdentityIndex", "default_cache_dir"]

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".otface-idx.npz"
_CACHE_VERSION = 1
PathLike = Union[str, os.PathLike]


def _fractional(arr: np.ndarray) -> np.ndarray:
    """Mask of the entries of a float array that are not integers (NaN and inf included)."""
    return ~np.isfinite(arr) | (arr != np.floor(arr))


def _integral(values, what: str) -> np.ndarray:
    """``values`` as int64, or an error naming the first entry that is not an integer (a float
    2.5 would otherwise become 2 without a word)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(_fractional(arr))
        if len(bad):
            raise RecordIOError(f"{what} {int(bad[0])} is {float(arr[bad[0]])!r}, not an integer")
    return arr.astype(np.int64)


def default_cache_dir() -> Path:
    """Where caches go when the dataset directory is read-only."""
    env = os.environ.get("OTFACE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "otface-plugin"


class IdentityIndex:
    """Identity -> dataset positions (see module docstring for positions vs record ids)."""

    def __init__(self, identity_labels: np.ndarray, offsets: np.ndarray,
                 order: Optional[np.ndarray] = None, *, num_positions: Optional[int] = None,
                 record_keys: Optional[np.ndarray] = None, record_base: int = 1,
                 source: str = "arrays"):
        self.identity_labels = np.asarray(identity_labels, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        if len(self.offsets) != len(self.identity_labels) + 1:
            raise ValueError("offsets must have one more entry than identity_labels")
        self.num_positions = int(num_positions if num_positions is not None
                                 else (self.offsets[-1] if order is None else len(self.order)))
        self._record_keys = record_keys
        self._record_base = record_base
        self.source = source

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ranges(cls, starts: np.ndarray, ends: np.ndarray,
                    identity_labels: Optional[np.ndarray] = None, *, first_record: int = 1,
                    num_positions: Optional[int] = None, source: str = "ranges"
                    ) -> "IdentityIndex":
        """From per-identity record ranges ``[starts[c], ends[c])`` of an InsightFace header;
        dataset position = record id - ``first_record``. Empty identities are dropped."""
        starts = _integral(starts, "the start of identity")
        ends = _integral(ends, "the end of identity")
        labels = (np.arange(len(starts), dtype=np.int64) if identity_labels is None
                  else _integral(identity_labels, "the label of identity"))
        if np.any(ends < starts):
            c = int(np.flatnonzero(ends < starts)[0])
            raise RecordIOError(f"identity {labels[c]} has range [{starts[c]}, {ends[c]})")
        keep = ends > starts
        starts, ends, labels = starts[keep], ends[keep], labels[keep]
        lo = starts - first_record
        if len(lo) and lo.min() < 0:
            raise RecordIOError(f"identity range starts before record {first_record}")
        counts = ends - starts
        offsets = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        if len(lo) == 0 or np.array_equal(lo, offsets[:-1]):
            order = None  # contiguous and sorted: positions of identity c are offsets[c]..
        else:
            if np.any(np.diff(np.sort(lo)) < counts[np.argsort(lo)][:-1]):
                raise RecordIOError("identity ranges overlap")
            # vectorised concatenation of aranges: position = lo[c] + (j - offsets[c])
            order = np.arange(offsets[-1], dtype=np.int64)
            order += np.repeat(lo - offsets[:-1], counts)
        n = num_positions if num_positions is not None else int((lo + counts).max(initial=0))
        return cls(labels, offsets, order, num_positions=n, record_base=first_record,
                   source=source)

    @classmethod
    def from_labels(cls, labels: np.ndarray, *, record_keys: Optional[np.ndarray] = None,
                    record_base: int = 0, valid: Optional[np.ndarray] = None,
                    source: str = "labels") -> "IdentityIndex":
        """From one integer label per dataset position (``valid`` False = not an image); a
        float label must be integral (3.0 is class 3, 2.5 an error naming its position)."""
        labels = np.asarray(labels)
        if labels.dtype.kind == "f":
            bad = _fractional(labels)
            if valid is not None:
                bad &= np.asarray(valid, dtype=bool)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise RecordIOError(f"the label at dataset position {i} is {float(labels[i])!r}, not "
                                    f"an integer class id")
            labels = np.where(np.isfinite(labels), labels, -1).astype(np.int64)
        n = len(labels)
        grouped = n and bool(np.all(labels[1:] >= labels[:-1]))
        if grouped and (valid is None or bool(np.all(valid))):
            # File order of InsightFace-style data: already grouped, no sort, implicit order.
            starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
            return cls(labels[starts], np.r_[starts, n].astype(np.int64), None,
                       num_positions=n, record_keys=record_keys, record_base=record_base,
                       source=source)
        pos = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid)
        lab = labels if valid is None else labels[pos]
        order = pos[np.argsort(lab, kind="stable")]
        sorted_lab = labels[order]
        if len(sorted_lab):
            starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
        else:
            starts = np.zeros(0, dtype=np.int64)
        offsets = np.r_[starts, len(order)].astype(np.int64)
        return cls(sorted_lab[starts], offsets, order, num_positions=n,
                   record_keys=record_keys, record_base=record_base, source=source)

    @classmethod
    def from_rec(cls, rec_path: PathLike, idx_path: Optional[PathLike] = None, *,
                 use_header: bool = True, cache: bool = True,
                 cache_dir: Optional[PathLike] = None, check_samples: int = 64
                 ) -> "IdentityIndex":
        """Index a ``.rec`` (``idx_path`` defaults to the same name with ``.idx``)."""
        rec_path = os.fspath(rec_path)
        idx_path = os.fspath(idx_path) if idx_path else os.path.splitext(rec_path)[0] + ".idx"
        for p in (rec_path, idx_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file")
        builder = _Builder(rec_path, idx_path, cache, cache_dir, check_samples)
        try:
            return builder.build(use_header)
        finally:
            builder.close()

    # ------------------------------------------------------------------ queries
    @property
    def num_identities(self) -> int:
        return len(self.identity_labels)

    @property
    def num_images(self) -> int:
        """Images that belong to an identity (what a sampler can draw)."""
        return int(self.offsets[-1])

    @property
    def counts(self) -> np.ndarray:
        """Images per identity (int64, aligned with ``identity_labels``)."""
        return np.diff(self.offsets)

    def positions(self, c: int) -> np.ndarray:
        """Dataset positions of the ``c``-th identity (0..num_identities-1)."""
        a, b = int(self.offsets[c]), int(self.offsets[c + 1])
        return np.arange(a, b, dtype=np.int64) if self.order is None else self.order[a:b]

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """Dataset positions at CSR slots (``offsets[c] + rank``), vectorised."""
        slots = np.asarray(slots, dtype=np.int64)
        return slots.copy() if self.order is None else self.order[slots]

    def record_ids(self, positions: np.ndarray) -> np.ndarray:
        """Record ids (``.idx`` keys) of dataset positions, as ``MXFaceDataset.imgidx`` maps."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._record_keys is not None:
            return self._record_keys[positions]
        return positions + self._record_base

    def labels(self) -> np.ndarray:
        """Label per dataset position (-1 where the position is not an indexed image)."""
        out = np.full(self.num_positions, -1, dtype=np.int64)
        out[self.gather(np.arange(self.num_images))] = np.repeat(self.identity_labels,
                                                                 self.counts)
        return out

    def __len__(self) -> int:
        return self.num_identities

    def __repr__(self) -> str:
        return (f"IdentityIndex({self.num_identities} identities, {self.num_images} images, "
                f"source={self.source})")

    def save(self, path: PathLike, meta: Optional[dict] = None) -> None:
        """Write to ``path`` atomically (temp file + rename)."""
        arrays = {"identity_labels": self.identity_labels, "offsets": self.offsets,
                  "num_positions": np.int64(self.num_positions),
                  "record_base": np.int64(self._record_base)}
        if self.order is not None:
            arrays["order"] = self.order
        if self._record_keys is not None:
            arrays["record_keys"] = self._record_keys
        for k, v in (meta or {}).items():
            arrays["meta_" + k] = np.asarray(v)
        with atomic_file(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: PathLike) -> Tuple["IdentityIndex", dict]:
        """(index, meta) from a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            meta = {k[5:]: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files
                    if k.startswith("meta_")}
            idx = cls(z["identity_labels"], z["offsets"],
                      z["order"] if "order" in z.files else None,
                      num_positions=int(z["num_positions"]),
                      record_keys=z["record_keys"] if "record_keys" in z.files else None,
                      record_base=int(z["record_base"]), source=f"cache {path}")
        return idx, meta


class _Builder:
    """Reads a .rec/.idx pair into an IdentityIndex (header ranges, else cached label scan)."""

    def __init__(self, rec: str, idx: str, cache: bool, cache_dir: Optional[PathLike],
                 check_samples: int):
        self.rec, self.idx = rec, idx
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.check_samples = check_samples
        # The .idx is parsed (and its offsets checked) once; every lookup goes through it.
        self.reader = MXIndexedRecordIO(idx, rec, "r")
        self.keys = self.reader.keys
        self.size = os.path.getsize(rec)
        self.mm = np.memmap(rec, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)

    def close(self) -> None:
        self.reader.close()

    # -- entry
    def build(self, use_header: bool) -> IdentityIndex:
        self.reader.check_coverage()
        head0 = unpack(self._read(0))[0] if bool(np.any(self.keys == 0)) else None
        rng = None if head0 is None else parse_header(head0, self.rec)
        if rng is not None:
            first, end = rng
            num_pos = max(first - 1, 0)  # MXFaceDataset: imgidx = range(1, first)
            if use_header and max(first, end) < FLOAT32_EXACT:
                index = self._from_header(first, end, num_pos)
                if index is not None:
                    return index
            elif use_header:
                log.warning("%s: header ranges exceed 2**24 and are float32-rounded; scanning "
                            "image labels instead (cached)", self.rec)
            keys = np.arange(1, first, dtype=np.int64)
            return self._cached_scan(keys, record_base=1)
        return self._cached_scan(self.keys, record_base=0)

    def _read(self, key: int) -> bytes:
        """One whole record (any layout) by key."""
        return self.reader.read_idx(key)

    # -- header ranges
    def _gather(self, offsets: np.ndarray, width: int) -> np.ndarray:
        """(n, width) bytes at byte ``offsets`` of the memory-mapped .rec, in bounded chunks."""
        out = np.empty((len(offsets), width), dtype=np.uint8)
        step = 1 << 20
        cols = np.arange(width, dtype=np.int64)
        for a in range(0, len(offsets), step):
            out[a:a + step] = self.mm[offsets[a:a + step, None] + cols]
        return out

    def _from_header(self, first: int, end: int, num_pos: int) -> Optional[IdentityIndex]:
        n_id = end - first
        if n_id <= 0:
            raise RecordIOError(f"{self.rec}: record 0 header has an empty identity range "
                                f"[{first}, {end})")
        pos = self.reader.offsets_of(np.arange(first, end, dtype=np.int64), "identity record")
        # An identity record is the frame header + IRHeader + 2 float32 labels.
        width = IR_FLOATS_AT + 8
        if pos.max() + width > self.size:
            raise RecordIOError(f"{self.rec}: identity records run past the end of the file")
        raw = self._gather(pos, width)
        magic, cflag, length, flag = frame_fields(raw)
        rng = raw[:, IR_FLOATS_AT:width].copy().view("<f4")
        bad = np.flatnonzero(magic != MAGIC)
        if len(bad):
            k = first + int(bad[0])
            raise RecordIOError(f"{self.rec}: identity record {k} at byte {int(pos[bad[0]])}: "
                                f"bad magic 0x{int(magic[bad[0]]):08x}")
        simple = ((cflag == 0) | ((cflag == 1) & (length >= IR_HEADER_SIZE + 8))) & (flag == 2)
        if not simple.all():
            # Unusual layout (multi-part, extra labels): read those records one by one.
            for i in np.flatnonzero(~simple):
                h = unpack(self._read(first + int(i)))[0]
                if h.flag < 2:
                    raise RecordIOError(
                        f"{self.rec}: identity record {first + int(i)} has no "
                        f"[start, end) range (flag {h.flag})")
                rng[i] = h.label[:2]
        bad = np.flatnonzero(_fractional(rng).any(axis=1))
        if len(bad):  # a range 1.5..3 would silently start at record 1
            k = first + int(bad[0])
            raise RecordIOError(f"{self.rec}: identity record {k} has range "
                                f"{rng[bad[0]].tolist()}, not two integers [start, end)")
        starts, ends = rng[:, 0].astype(np.int64), rng[:, 1].astype(np.int64)
        if len(starts) and (starts.min() < 1 or ends.max() > first):
            raise RecordIOError(
                f"{self.rec}: identity ranges [{starts.min()}, {ends.max()}) fall outside the "
                f"image records [1, {first})")
        index = IdentityIndex.from_ranges(starts, ends, first_record=1, num_positions=num_pos,
                                          source=f"header ranges of {self.rec}")
        if not self._labels_agree(index):
            log.warning("%s: image labels disagree with the header's identity numbering; "
                        "scanning labels instead", self.rec)
            return None
        return index

    def _labels_agree(self, index: IdentityIndex) -> bool:
        """Spot-check: image labels equal the identity ordinal (InsightFace convention)."""
        if self.check_samples <= 0 or index.num_images == 0:
            return True
        rng = np.random.default_rng(0)
        # without replacement: a repeat draw would leave an image unchecked
        slots = rng.choice(index.num_images, size=min(self.check_samples, index.num_images),
                           replace=False)
        c = np.searchsorted(index.offsets, slots, side="right") - 1
        keys = index.record_ids(index.gather(slots))
        labels, valid = self._scan_labels(keys)
        return bool(np.all(valid) and np.array_equal(labels, index.identity_labels[c]))

    # -- label scan
    def _scan_labels(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(label, is_image) for records ``keys``: label = header.label, or label[0] when
        ``flag > 0``, exactly as MXFaceDataset reads it. A record with nothing after its
        labels (an identity or header record) is not an image."""
        pos = self.reader.offsets_of(keys, "record")
        n = len(pos)
        labels = np.zeros(n, dtype=np.float64)
        valid = np.ones(n, dtype=bool)
        width = IR_FLOATS_AT + 4  # up to the first float label
        fast = pos + width <= self.size
        fi = np.flatnonzero(fast)
        raw = self._gather(pos[fi], width)
        magic, cflag, length, flag = frame_fields(raw)
        bad = np.flatnonzero(magic != MAGIC)
        if len(bad):
            i = fi[bad[0]]
            raise RecordIOError(f"{self.rec}: record {int(keys[i])} at byte {int(pos[i])}: bad "
                                f"magic 0x{int(magic[bad[0]]):08x} (.idx does not match .rec?)")
        scalar = frame_field(raw, IR_LABEL_AT, "<f4")
        first_float = frame_field(raw, IR_FLOATS_AT, "<f4")
        need = np.where(flag > 0, IR_HEADER_SIZE + 4, IR_HEADER_SIZE)
        simple = (cflag == 0) & (length >= need) | (cflag == 1) & (length >= need)
        labels[fi] = np.where(flag > 0, first_float, scalar)
        # cflag 1 means the payload continues past a magic, so it is never empty
        valid[fi] = (cflag == 1) | (length.astype(np.int64)
                                    > IR_HEADER_SIZE + 4 * flag.astype(np.int64))
        fast[fi[~simple]] = False
        for i in np.flatnonzero(~fast):
            try:
                h, payload = unpack(self._read(int(keys[i])))
            except RecordIOError as e:
                msg = str(e)
                raise RecordIOError(msg if self.rec in msg else
                                    f"{self.rec}: record {int(keys[i])}: {msg}") from None
            labels[i] = h.label if h.flag == 0 else h.label[0]
            valid[i] = len(payload) > 0
        ok = ~valid | np.isfinite(labels) & (labels >= 0) & (labels == np.floor(labels))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise RecordIOError(f"{self.rec}: record {int(keys[i])} has label {labels[i]!r}, "
                                f"not a class id")
        return np.where(valid, labels, -1).astype(np.int64), valid

    def _cached_scan(self, keys: np.ndarray, record_base: int) -> IdentityIndex:
        meta = self._fingerprint()
        if self.cache:
            for path in self._cache_paths():
                if path.is_file():
                    try:
                        index, got = IdentityIndex.load(path)
                    except Exception as e:  # corrupt cache: rebuild
                        log.warning("ignoring unreadable index cache %s: %s", path, e)
                        continue
                    if all(_same(got.get(k), v) for k, v in meta.items()):
                        return index
                    log.info("index cache %s is stale or for another file; rebuilding", path)
        labels, valid = self._scan_labels(keys)
        index = IdentityIndex.from_labels(
            labels, record_keys=None if record_base == 1 else keys, record_base=record_base,
            valid=valid, source=f"label scan of {self.rec}")
        if self.cache:
            self._write_cache(index, meta)
        return index

    def _fingerprint(self) -> dict:
        st_r, st_i = os.stat(self.rec), os.stat(self.idx)
        h = hashlib.blake2b(digest_size=16)
        with open(self.idx, "rb") as f:  # head + tail: cheap even for a 1 GB .idx
            h.update(f.read(1 << 20))
            if st_i.st_size > 1 << 21:
                f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
        return {"version": _CACHE_VERSION, "rec_path": os.path.realpath(self.rec),
                "rec_size": st_r.st_size, "rec_mtime_ns": st_r.st_mtime_ns,
                "idx_size": st_i.st_size, "idx_mtime_ns": st_i.st_mtime_ns,
                "idx_digest": h.hexdigest()}

    def _cache_paths(self):
        yield Path(self.rec + CACHE_SUFFIX)
        real = os.path.realpath(self.rec)
        tag = hashlib.sha1(real.encode()).hexdigest()[:16]
        yield self.cache_dir / f"{os.path.basename(real)}-{tag}{CACHE_SUFFIX}"

    def _write_cache(self, index: IdentityIndex, meta: dict) -> None:
        for path in self._cache_paths():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                index.save(path, meta)
                return
            except OSError as e:  # read-only dataset dir: try the user cache dir next
                log.info("cannot write index cache %s (%s)", path, e)
        log.warning("%s: could not write the identity index cache anywhere", self.rec)


def _same(a, b) -> bool:
    if a is None:
        return False
    if isinstance(a, np.ndarray):
        a = a.item() if a.ndim == 0 else a.tolist()
    return a == b
