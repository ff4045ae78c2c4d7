"""Facts of the InsightFace dataset layout that readers check: the record-0 header, the
``property`` file, which records the recipe's ``MXFaceDataset`` reads, and what a valid label is.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np

from otface_plugin.data.errors import RecordIOError
from otface_plugin.data.recordio import IRHeader, MXIndexedRecordIO, unpack

__all__ = ["FLOAT32_EXACT", "ClassBound", "check_label", "class_bound", "dataset_record_ids",
           "header_range", "parse_header", "read_property"]

FLOAT32_EXACT = 1 << 24  # float32 labels are exact integers up to here (header ranges beyond: rounded)


def parse_header(head: IRHeader, uri: str) -> Optional[Tuple[int, int]]:
    """``(first identity record, end)`` of record 0's header ``head`` when it is an InsightFace
    header (``flag > 0``), else None. A range that is not two integers ``1 <= first <= end`` is
    an error naming the file."""
    if head.flag <= 0:
        return None
    lab = np.asarray(head.label, dtype=np.float64)[:2]
    if len(lab) < 2 or not np.all(np.isfinite(lab)) or np.any(lab != np.floor(lab)) \
            or not 1 <= lab[0] <= lab[1]:
        raise RecordIOError(f"{uri}: record 0 is a header (flag {head.flag}) but its label "
                            f"{lab.tolist()} is not an identity range [first, end) with "
                            f"1 <= first <= end")
    return int(lab[0]), int(lab[1])


def header_range(reader: MXIndexedRecordIO) -> Optional[Tuple[int, int]]:
    """:func:`parse_header` of the reader's record 0 (None without one)."""
    if 0 not in reader.idx:
        return None
    return parse_header(unpack(reader.read_idx(0))[0], reader.uri)


def dataset_record_ids(reader: MXIndexedRecordIO, head: Optional[Tuple[int, int]]) -> np.ndarray:
    """Records the recipe's ``MXFaceDataset`` reads, in dataset-position order:
    ``range(1, first)`` under a header, else every ``.idx`` key in file order. Keys it would ask
    for that the ``.idx`` lacks are an error naming the first one."""
    if head is None:
        return np.asarray(reader.keys, dtype=np.int64)
    ids = np.arange(1, head[0], dtype=np.int64)
    missing = reader.missing_keys(ids)
    if len(missing):
        raise RecordIOError(
            f"{reader.idx_path}: record {int(missing[0])} is not in the index ({len(missing)} of "
            f"the {len(ids)} image records 1..{head[0] - 1} named by record 0 of {reader.uri} "
            f"are missing): the .idx is truncated or belongs to another file")
    return ids


def read_property(path: str) -> Optional[int]:
    """``num_classes`` from an InsightFace ``property`` file (``num_classes,h,w``), or None
    when there is none; a malformed one is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    fields = text.split(",")
    try:
        n = int(fields[0])
        if n <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width' with num_classes > 0, "
                            f"got {text[:80]!r}") from None
    return n


class ClassBound(NamedTuple):
    """Labels must lie in ``[0, num_classes)``; None = unknown (only ``>= 0`` is checked)."""

    num_classes: Optional[int]
    source: str


def class_bound(rec_path: str, head: Optional[Tuple[int, int]]) -> ClassBound:
    """The tightest known class count: the header's identity records (when its float32 range is
    exact) and, next to a ``train.rec``, the ``property`` file."""
    found = []
    if head is not None and head[1] < FLOAT32_EXACT:
        found.append((head[1] - head[0], f"the {head[1] - head[0]} identity records named by "
                                         f"record 0"))
    if os.path.basename(rec_path) == "train.rec":
        prop = os.path.join(os.path.dirname(rec_path), "property")
        n = read_property(prop)
        if n is not None:
            found.append((n, f"num_classes {n} in {prop}"))
    if not found:
        return ClassBound(None, "no header or property file gives the class count")
    return ClassBound(*min(found))


def check_label(label: float, bound: ClassBound, rec_path: str, key: int,
                position: Optional[int] = None) -> int:
    """``label`` as a class id, or an error naming the file, the record and the bound."""
    ok = math.isfinite(label) and label == math.floor(label) and label >= 0 and (
        bound.num_classes is None or label < bound.num_classes)
    if not ok:
        where = f"record {key}" + (f" (dataset position {position})" if position is not None
                                   else "")
        want = (f"a class id in [0, {bound.num_classes}) ({bound.source})"
                if bound.num_classes is not None else "a class id >= 0")
        raise RecordIOError(f"{rec_path}: {where} has label {label!r}, not {want}")
    return int(label)
