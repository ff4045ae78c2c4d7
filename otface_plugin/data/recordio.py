"""MXNet RecordIO (``.rec`` + ``.idx``) in pure Python, byte-compatible with ``mx.recordio``.

Same names and semantics as mxnet 1.9.1's ``mxnet/recordio.py`` (whose C++ side is dmlc-core's
``recordio.cc``), so code written against ``mx.recordio`` runs unchanged with mxnet absent.

On-disk format of one record (all integers little-endian uint32)::

    magic 0xced7230a | lrec = cflag << 29 | length | payload | zero padding to 4 bytes

A payload that contains the magic at a 4-byte aligned offset is split there into parts (the magic
itself is dropped and re-inserted by the reader): cflag 1 = first part, 2 = middle, 3 = last,
0 = a record in one part. Records must be shorter than 2**29 bytes.

Differences from mxnet, all deliberate:
- readers use ``os.pread`` with their own offset, so a reader opened before ``fork`` (DataLoader
  workers) keeps working in every child without the ``reset()`` dance mxnet needs;
- malformed files raise :class:`RecordIOError` naming the file, record key and byte offset
  (mxnet aborts with a C++ ``CHECK`` message);
- an indexed reader keeps keys and offsets in numpy arrays (WebFace42M's ``.idx`` has 42M lines;
  a dict of Python ints would cost gigabytes). ``keys`` is then an int64 array, ``idx`` a
  read-only mapping. A writer keeps mxnet's ``dict``/``list``.
"""
from __future__ import annotations

import numbers
import os
import struct
import threading
import warnings
from collections import namedtuple
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

from otface_plugin.data.errors import RecordIOError

__all__ = [
    "FRAME_HEADER_SIZE",
    "IR_HEADER_SIZE",
    "MAGIC",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "MissingRecordError",
    "RecordIOError",
    "check_coverage",
    "check_offsets",
    "frame_record",
    "pack",
    "pack_img",
    "parse_idx",
    "split_lrec",
    "unpack",
    "unpack_img",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
_HEAD = struct.Struct("<II")
FRAME_HEADER_SIZE = _HEAD.size
"""Bytes in front of each record part: the magic and ``lrec``."""

BytesLike = Union[bytes, bytearray, memoryview]


# --------------------------------------------------------------------------- framing


def _lrec(cflag: int, length: int) -> bytes:
    return _HEAD.pack(MAGIC, (cflag << _LEN_BITS) | length)


def split_lrec(lrec: Any) -> Tuple[Any, Any]:
    """``(cflag, length)`` of a frame header's ``lrec`` word: an int, or a numpy uint32 array
    for many headers at once."""
    return lrec >> _LEN_BITS, lrec & _LEN_MASK


def frame_record(buf: BytesLike) -> bytes:
    """Bytes that dmlc's ``RecordIOWriter::WriteRecord`` writes for ``buf``."""
    buf = bytes(buf)
    n = len(buf)
    if n >= 1 << _LEN_BITS:
        raise RecordIOError(f"RecordIO records must be shorter than 2**29 bytes, got {n}")
    out = []
    dptr = 0
    lower_align = n & ~3
    i = buf.find(_MAGIC_BYTES)
    # Only magics at 4-aligned offsets split the record: the reader scans aligned words.
    while 0 <= i and i + 4 <= lower_align:
        if i % 4 == 0:
            out.append(_lrec(1 if dptr == 0 else 2, i - dptr))
            out.append(buf[dptr:i])
            dptr = i + 4
            i = buf.find(_MAGIC_BYTES, i + 4)
        else:
            i = buf.find(_MAGIC_BYTES, i + 1)
    out.append(_lrec(3 if dptr != 0 else 0, n - dptr))
    out.append(buf[dptr:])
    pad = (-n) % 4
    if pad:
        out.append(b"\0" * pad)
    return b"".join(out)


def _pread(fd: int, n: int, offset: int, lock: threading.Lock) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    with lock:  # Windows: no pread, emulate with seek + read under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


class _RecordFile:
    """Read-only access to framed records at byte offsets."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self.fd).st_size
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read_at(self, pos: int, what: str) -> Optional[Tuple[bytes, int]]:
        """(payload, next offset) of the record starting at ``pos``; None at a clean EOF."""
        parts = []
        first = True
        while True:
            head = _pread(self.fd, FRAME_HEADER_SIZE, pos, self._lock)
            if not head and first and pos >= self.size:
                if pos > self.size:
                    raise RecordIOError(
                        f"{self.path}: {what} starts at byte {pos}, past the end of the file "
                        f"({self.size} bytes)")
                return None
            if len(head) < FRAME_HEADER_SIZE:
                raise RecordIOError(
                    f"{self.path}: truncated file: {what} needs an 8-byte header at byte {pos}, "
                    f"only {len(head)} bytes left ({self.size} bytes in file)")
            magic, lrec = _HEAD.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.path}: {what}: bad magic 0x{magic:08x} at byte {pos} (expected "
                    f"0x{MAGIC:08x}); not a RecordIO file, or the offset is not a record start")
            cflag, length = split_lrec(lrec)
            if first and cflag in (2, 3):
                raise RecordIOError(
                    f"{self.path}: {what}: byte {pos} is the continuation part (cflag {cflag}) "
                    f"of a multi-part record, not a record start")
            if cflag > 3:
                raise RecordIOError(f"{self.path}: {what}: invalid cflag {cflag} at byte {pos}")
            padded = (length + 3) & ~3
            data = _pread(self.fd, padded, pos + FRAME_HEADER_SIZE, self._lock) if padded else b""
            if len(data) < padded:
                raise RecordIOError(
                    f"{self.path}: truncated file: {what} at byte {pos} declares {length} "
                    f"payload bytes, only {len(data)} present ({self.size} bytes in file)")
            pos += FRAME_HEADER_SIZE + padded
            if first and cflag == 0:
                return (data if padded == length else data[:length]), pos
            parts.append(data[:length])
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos
            first = False


# --------------------------------------------------------------------------- sequential


class MXRecordIO:
    """Sequential reader/writer of a ``.rec`` file (``flag`` 'r' or 'w'), like mxnet's."""

    def __init__(self, uri: Union[str, os.PathLike], flag: str):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.is_open = False
        self.writable = False
        self._reader: Optional[_RecordFile] = None
        self._writer = None
        self._pos = 0
        self.open()

    # -- lifecycle
    def open(self) -> None:
        """Opens the record file ('w' truncates it, as mxnet does)."""
        if self.flag == "w":
            self._writer = open(self.uri, "wb")
            self.writable = True
        elif self.flag == "r":
            self._reader = _RecordFile(self.uri)
            self.writable = False
            self._pos = 0
        else:
            raise ValueError("Invalid flag %s" % self.flag)
        self.is_open = True

    def close(self) -> None:
        """Closes the record file."""
        if not getattr(self, "is_open", False):
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.is_open = False

    def reset(self) -> None:
        """Back to the first record; for a writer this truncates the file (mxnet semantics)."""
        self.close()
        self.open()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A reader pickles as its path and position (DataLoader with spawn); a pickled writer
        # would truncate its file on unpickling (mxnet does exactly that), so we refuse.
        if self.writable:
            raise TypeError(f"cannot pickle a RecordIO writer ({self.uri})")
        d = {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_writer")}
        d["_reopen"] = self.is_open
        return d

    def __setstate__(self, d: dict) -> None:
        reopen = d.pop("_reopen")
        pos = d.get("_pos", 0)
        self.__dict__.update(d)
        self._reader, self._writer, self.is_open = None, None, False
        if reopen:
            self.open()
            self._pos = pos

    # -- io
    def _check_open(self) -> None:
        if not self.is_open:
            raise ValueError(f"{self.uri}: RecordIO file is closed")

    def write(self, buf: BytesLike) -> None:
        """Appends ``buf`` (bytes) as one record."""
        assert self.writable, f"{self.uri} is opened for reading"
        self._check_open()
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"record must be bytes, got {type(buf).__name__}")
        self._writer.write(frame_record(buf))

    def read(self) -> Optional[bytes]:
        """Returns the next record, or None at the end of the file."""
        assert not self.writable, f"{self.uri} is opened for writing"
        self._check_open()
        got = self._reader.read_at(self._pos, f"record at byte {self._pos}")
        if got is None:
            return None
        buf, self._pos = got
        return buf

    def __iter__(self) -> Iterator[bytes]:
        while True:
            buf = self.read()
            if buf is None:
                return
            yield buf


# --------------------------------------------------------------------------- indexed


class _IndexMap(Mapping):
    """Read-only ``key -> byte offset`` mapping over numpy arrays (last duplicate wins, as in
    mxnet's dict)."""

    def __init__(self, keys: np.ndarray, pos: np.ndarray):
        self._keys = keys
        self._pos = pos
        n = len(keys)
        self._base = None
        if n and keys[-1] - keys[0] == n - 1 and bool(np.all(np.diff(keys) == 1)):
            self._base = int(keys[0])  # the usual case: consecutive keys, direct lookup
        if self._base is None:
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]

    def _find(self, key: Any) -> int:
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise KeyError(key) from None
        if k != key:
            raise KeyError(key)
        if self._base is not None:
            i = k - self._base
            if 0 <= i < len(self._keys):
                return i
            raise KeyError(key)
        j = int(np.searchsorted(self._sorted, k, side="right")) - 1
        if j >= 0 and self._sorted[j] == k:
            return int(self._order[j])
        raise KeyError(key)

    def __getitem__(self, key: Any) -> int:
        return int(self._pos[self._find(key)])

    def locate(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(offsets, found)`` for int array ``keys`` (vectorised ``self[key]``): the byte
        offset of each key, meaningless where ``found`` is False."""
        keys = np.asarray(keys, dtype=np.int64)
        n = len(self._keys)
        if not n:
            return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        if self._base is not None:
            row = keys - self._base
            found = (row >= 0) & (row < n)
            return self._pos[np.where(found, row, 0)], found
        j = np.maximum(np.searchsorted(self._sorted, keys, side="right") - 1, 0)
        found = self._sorted[j] == keys
        return self._pos[self._order[j]], found

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """The entries of int array ``keys`` that are not keys here (vectorised)."""
        keys = np.asarray(keys, dtype=np.int64)
        return keys[~self.locate(keys)[1]]

    def __contains__(self, key: object) -> bool:
        try:
            self._find(key)
            return True
        except KeyError:
            return False

    def __iter__(self) -> Iterator[int]:
        seen = set() if self._base is None else None
        for k in self._keys.tolist():
            if seen is not None:
                if k in seen:
                    continue
                seen.add(k)
            yield k

    def __len__(self) -> int:
        return len(self._keys) if self._base is not None else len(np.unique(self._keys))


def _key_str(key: Any) -> str:
    """A key for messages: ``3`` for numpy or Python ints, ``'name'`` for strings."""
    return str(int(key)) if isinstance(key, (numbers.Integral, np.integer)) else repr(key)


def parse_idx(path: str, key_type: type) -> Tuple[Any, Any]:
    """Keys and offsets of an ``.idx`` file (lines ``key<TAB>offset``)."""
    with open(path, "rb") as f:
        data = f.read()
    if key_type is int and data:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:  # fast path: 42M lines in seconds, no Python object per line
                flat = np.fromstring(data, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                flat = None
        lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        if flat is not None and flat.size == 2 * lines:
            return flat[0::2].copy(), flat[1::2].copy()
    keys, pos = [], []
    for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        fields = raw.strip().split("\t")
        try:
            if len(fields) != 2:
                raise ValueError("expected 2 tab-separated fields")
            keys.append(key_type(fields[0]))
            pos.append(int(fields[1]))
        except ValueError as e:
            raise RecordIOError(
                f"{path}: line {lineno} is not 'key<TAB>byte offset': {raw!r} ({e})") from None
    if key_type is int:
        return np.asarray(keys, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    return keys, pos


class MissingRecordError(RecordIOError, KeyError):
    """A key the ``.idx`` does not have: a ``KeyError`` (mxnet raises one) and a
    :class:`RecordIOError` whose message names the files."""

    __str__ = Exception.__str__  # KeyError would print the message in quotes


def check_offsets(idx_path: str, uri: str, keys: Any, pos: np.ndarray, size: int) -> None:
    """Every ``.idx`` offset must lie inside the ``.rec`` (``size`` bytes)."""
    bad = np.flatnonzero((pos < 0) | (pos >= size))
    if len(bad):
        i = int(bad[0])
        where = "before the start" if pos[i] < 0 else "past the end"
        raise RecordIOError(
            f"{idx_path}: record {_key_str(keys[i])} (line {i + 1}) points to byte {int(pos[i])}, "
            f"{where} of {uri} ({size} bytes; {len(bad)} of {len(pos)} entries are outside it): "
            f"the .rec is truncated or the .idx belongs to another file")


def _record_starts(f: "_RecordFile") -> np.ndarray:
    """Byte offsets of every record in the file, from the framing alone (one pass)."""
    starts, pos = [], 0
    while pos < f.size:
        head = _pread(f.fd, FRAME_HEADER_SIZE, pos, f._lock)
        if len(head) < FRAME_HEADER_SIZE:
            raise RecordIOError(f"{f.path}: truncated file: {len(head)} bytes at byte {pos} are "
                                f"not a record header")
        magic, lrec = _HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{f.path}: bad magic 0x{magic:08x} at byte {pos}, where the "
                                f"previous record ends")
        cflag, length = split_lrec(lrec)
        if cflag in (0, 1):
            starts.append(pos)
        pos += FRAME_HEADER_SIZE + ((length + 3) & ~3)
    if pos > f.size:
        raise RecordIOError(f"{f.path}: truncated file: the last record ends at byte {pos}, the "
                            f"file has {f.size} bytes")
    return np.asarray(starts, dtype=np.int64)


def check_coverage(f: "_RecordFile", idx_path: str, keys: Any, pos: np.ndarray,
                   full: bool = False) -> int:
    """The ``.idx`` must index every record of the ``.rec`` (an ``.idx`` cut short by a killed
    writer, or written for a shorter file, leaves records nobody can read).

    Cheap check (one read): a non-empty ``.rec`` has entries, and the record at the highest
    offset ends at the end of the file. ``full`` walks the framing of the whole file and also
    finds records missing from the middle. Returns the number of records checked."""
    if not len(pos):
        if f.size:
            raise RecordIOError(f"{idx_path}: no entries, but {f.path} holds {f.size} bytes of "
                                f"records: the .idx is empty or truncated; rebuild it")
        return 0
    if full:
        starts = _record_starts(f)
        extra = np.setdiff1d(np.unique(pos), starts)
        if len(extra):
            i = int(np.flatnonzero(pos == extra[0])[0])
            raise RecordIOError(f"{idx_path}: record {_key_str(keys[i])} (line {i + 1}) points to "
                                f"byte {int(extra[0])}, which is not a record start in {f.path}")
        unindexed = np.setdiff1d(starts, pos)
        if len(unindexed):
            raise RecordIOError(
                f"{idx_path}: the record at byte {int(unindexed[0])} of {f.path} has no entry "
                f"({len(unindexed)} of {len(starts)} records have none): the .idx is truncated or "
                f"belongs to another file")
        return len(starts)
    i = int(np.argmax(pos))
    got = f.read_at(int(pos[i]), f"record {_key_str(keys[i])} (line {i + 1} of {idx_path})")
    end = got[1] if got is not None else int(pos[i])
    if end != f.size:
        raise RecordIOError(
            f"{idx_path}: the last indexed record ({_key_str(keys[i])}, line {i + 1}) ends at byte "
            f"{end} but {f.path} has {f.size} bytes: records after it have no entry (the .idx is "
            f"truncated or belongs to another file)")
    return len(pos)


class MXIndexedRecordIO(MXRecordIO):
    """Random-access reader/writer over ``.rec`` + ``.idx`` (``read_idx``/``write_idx``)."""

    def __init__(self, idx_path: Union[str, os.PathLike], uri: Union[str, os.PathLike],
                 flag: str, key_type: type = int):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx: Mapping = {}
        self.keys: Any = []
        self.fidx = None
        self._offsets = np.zeros(0, dtype=np.int64)
        super().__init__(uri, flag)

    def open(self) -> None:
        super().open()
        if self.writable:
            self.fidx = open(self.idx_path, "w")
            self.idx, self.keys = {}, []
            return
        keys, pos = parse_idx(self.idx_path, self.key_type)
        if isinstance(keys, np.ndarray):
            self.idx, self.keys = _IndexMap(keys, pos), keys
        else:
            self.idx, self.keys = dict(zip(keys, pos)), keys
        self._offsets = np.asarray(pos, dtype=np.int64)  # every line, duplicates included
        check_offsets(self.idx_path, self.uri, keys, self._offsets, self._reader.size)

    def missing_keys(self, keys: np.ndarray) -> np.ndarray:
        """The int ``keys`` that have no ``.idx`` entry."""
        keys = np.asarray(keys, dtype=np.int64)
        if isinstance(self.idx, _IndexMap):
            return self.idx.missing(keys)
        return np.asarray([k for k in keys.tolist() if k not in self.idx], dtype=np.int64)

    def offsets_of(self, keys: np.ndarray, what: str = "record") -> np.ndarray:
        """Byte offsets of the int ``keys`` (vectorised); a key without an entry raises
        :class:`MissingRecordError` (``what`` names the kind of record in the message)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not isinstance(self.idx, _IndexMap):  # a writer, or str keys
            return np.asarray([self._offset(k, what) for k in keys.tolist()], dtype=np.int64)
        pos, found = self.idx.locate(keys)
        if not found.all():
            missing = keys[~found]
            raise self._missing(missing[0], what, len(missing))
        return pos

    def check_coverage(self, full: bool = False) -> int:
        """Check that the ``.idx`` indexes the whole ``.rec`` (see :func:`check_coverage`);
        returns the number of records in the ``.rec`` when ``full``, else of ``.idx`` entries."""
        assert not self.writable
        self._check_open()
        return check_coverage(self._reader, self.idx_path, self.keys, self._offsets, full)

    def close(self) -> None:
        if not getattr(self, "is_open", False):
            return
        super().close()
        if self.fidx is not None:
            self.fidx.close()
            self.fidx = None

    def __getstate__(self) -> dict:
        d = super().__getstate__()
        for k in ("idx", "keys", "fidx", "_offsets"):
            d.pop(k, None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.idx, self.keys, self.fidx = {}, [], None
        self._offsets = np.zeros(0, dtype=np.int64)
        super().__setstate__(d)  # re-reads the .idx when it reopens

    def _missing(self, key: Any, what: str = "record", count: int = 1) -> MissingRecordError:
        """The one error for keys the ``.idx`` lacks (``count`` of them, ``key`` the first)."""
        more = f" ({count} keys missing)" if count > 1 else ""
        return MissingRecordError(f"{self.idx_path}: {what} {_key_str(key)} is not in the index "
                                  f"of {self.uri}{more}")

    def _offset(self, idx: Any, what: str = "record") -> int:
        try:
            return self.idx[idx]
        except KeyError:
            raise self._missing(idx, what) from None

    def seek(self, idx: Any) -> None:
        """Moves the sequential read position to record ``idx``."""
        assert not self.writable
        self._check_open()
        self._pos = self._offset(idx)

    def tell(self) -> int:
        """Byte offset where the next record will be written."""
        assert self.writable
        return self._writer.tell()

    def read_idx(self, idx: Any) -> bytes:
        """Returns the record with key ``idx``; an unknown key raises
        :class:`MissingRecordError`, a ``KeyError`` as in mxnet that names the files."""
        assert not self.writable, f"{self.uri} is opened for writing"
        self._check_open()
        pos = self._offset(idx)
        got = self._reader.read_at(pos, f"record {_key_str(idx)} "
                                        f"(from {os.path.basename(self.idx_path)})")
        if got is None:
            raise RecordIOError(
                f"{self.uri}: record {_key_str(idx)} points to byte {pos}, the end of the file "
                f"({self._reader.size} bytes); the .rec is truncated")
        buf, self._pos = got
        return buf

    def write_idx(self, idx: Any, buf: BytesLike) -> None:
        """Appends ``buf`` as record ``idx`` and adds it to the index."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self.fidx.write("%s\t%d\n" % (str(key), pos))
        self.idx[key] = pos
        self.keys.append(key)


# --------------------------------------------------------------------------- image records

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
"""Record header: ``flag`` (number of float labels, 0 for one scalar label), ``label`` (float or
float32 array), ``id``, ``id2`` (uint64). Same namedtuple name and fields as mxnet's."""

_IR_FORMAT = "<IfQQ"  # mxnet uses native 'IfQQ': identical bytes on little-endian hosts
IR_HEADER_SIZE = struct.calcsize(_IR_FORMAT)
"""Bytes of a packed :data:`IRHeader` (in front of the float labels and the payload)."""

# Where a one-part record's fields lie from the start of its frame, for reading many records
# at once from a memory map (identity_index.py): the frame header (magic, lrec), then the
# IRHeader (flag, scalar label, id, id2), then ``flag`` float32 labels.
FRAME_MAGIC_AT = 0
FRAME_LREC_AT = struct.calcsize("<I")
IR_FLAG_AT = FRAME_HEADER_SIZE
IR_LABEL_AT = FRAME_HEADER_SIZE + struct.calcsize(_IR_FORMAT[:2])  # after the flag ("<I")
IR_FLOATS_AT = FRAME_HEADER_SIZE + IR_HEADER_SIZE


def frame_field(raw: np.ndarray, at: int, dtype: str = "<u4") -> np.ndarray:
    """The 4-byte field at byte ``at`` of every row of ``raw`` (one row of bytes per record)."""
    return raw[:, at:at + 4].copy().view(dtype)[:, 0]


def frame_fields(raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(magic, cflag, length, IRHeader flag) of the records whose first bytes are ``raw``'s rows."""
    cflag, length = split_lrec(frame_field(raw, FRAME_LREC_AT))
    return frame_field(raw, FRAME_MAGIC_AT), cflag, length, frame_field(raw, IR_FLAG_AT)


def pack(header: Any, s: BytesLike) -> bytes:
    """Header + payload -> record bytes. A non-scalar label is stored as ``flag`` float32 values
    in front of the payload and the header's label field is 0 (mxnet semantics)."""
    header = IRHeader(*header)
    s = bytes(s)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + s
    return struct.pack(_IR_FORMAT, *header) + s


def unpack(s: BytesLike) -> Tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload); ``label`` is a float32 array when ``flag > 0``."""
    if len(s) < IR_HEADER_SIZE:
        raise RecordIOError(
            f"record of {len(s)} bytes is too short for an IRHeader ({IR_HEADER_SIZE} bytes)")
    header = IRHeader(*struct.unpack(_IR_FORMAT, s[:IR_HEADER_SIZE]))
    s = s[IR_HEADER_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(
                f"record header declares {header.flag} float labels but only {len(s)} bytes "
                f"follow it")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[header.flag * 4:]
    return header, s


def pack_img(header: Any, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg",
             *, channel_order: str = "bgr") -> bytes:
    """Encode ``img`` (mxnet/cv2 convention: BGR, or grayscale HxW) and pack it with ``header``.

    ``quality`` is the JPEG quality (1-100) or, for ``.png``, the zlib level (capped at 9).
    Pass ``channel_order="rgb"`` for an RGB array.
    """
    from otface_plugin.data.imagecodec import encode_image

    return pack(header, encode_image(img, img_fmt=img_fmt, quality=quality,
                                     channel_order=channel_order))


def unpack_img(s: BytesLike, iscolor: int = -1, *, channel_order: str = "bgr"
               ) -> Tuple[IRHeader, np.ndarray]:
    """Unpack a record and decode its image like ``cv2.imdecode(buf, iscolor)``: BGR by default,
    as mxnet returns it (``iscolor`` -1 keeps the stored channels, 0 grayscale, 1 colour).

    Note the recipe's ``MXFaceDataset`` decodes with ``mx.image.imdecode``, which gives RGB; use
    ``channel_order="rgb"`` or :func:`otface_plugin.data.imagecodec.decode_image` for that.
    """
    from otface_plugin.data.imagecodec import decode_image_cv2_style

    header, buf = unpack(s)
    return header, decode_image_cv2_style(buf, iscolor, channel_order=channel_order)
