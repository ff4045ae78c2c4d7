"""Summarise a ``.rec``: header, identities, images, image size, label range."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from otface_plugin.data.dataset import read_image_record
from otface_plugin.data.encoding import progress_bar
from otface_plugin.data.errors import RecordIOError
from otface_plugin.data.identity_index import IdentityIndex
from otface_plugin.data.layout import (FLOAT32_EXACT, check_label, class_bound,
                                       dataset_record_ids, header_range)
from otface_plugin.data.recordio import MXIndexedRecordIO, unpack

__all__ = ["inspect_rec", "format_summary"]


def _resolve(path: str):
    if os.path.isdir(path):
        path = os.path.join(path, "train.rec")
    return path, os.path.splitext(path)[0] + ".idx"


def _header_identities(rec: str, idx: str, head: Optional[Tuple[int, int]]
                       ) -> Optional[IdentityIndex]:
    """The identity ranges exactly as record 0's header states them (no label spot check, no
    cache), or None without a header or when its float32 ranges are rounded."""
    if head is None or max(head) >= FLOAT32_EXACT:
        return None
    return IdentityIndex.from_rec(rec, idx, cache=False, check_samples=0)


def _check_identity(ranges: IdentityIndex, claimed: np.ndarray, rec: str, head: Tuple[int, int],
                    key: int, position: int, label: int) -> None:
    """An image record inside identity c's header range must carry label c: InsightFace's
    layout, and what a sampler built from the header assumes. Records in no range are left
    alone (the header does not claim them)."""
    c = int(claimed[position])
    if c < 0 or label == c:
        return
    slot = int(np.searchsorted(ranges.identity_labels, c))
    records = ranges.record_ids(ranges.positions(slot))
    raise RecordIOError(
        f"{rec}: record {key} (dataset position {position}) has label {label}, but identity "
        f"record {head[0] + c} of the header puts records [{int(records.min())}, "
        f"{int(records.max()) + 1}) in identity {c}")


def inspect_rec(path: os.PathLike, *, verify: bool = False, cache: bool = True,
                progress: Optional[bool] = None) -> Dict[str, Any]:
    """Summary dict. Labels are checked against the class count (header, ``property``):
    the identity labels of the index always, every record's label with ``verify``, which also
    decodes every record the recipe's dataset reads and checks that the ``.idx`` indexes every
    record of the ``.rec``. Errors name the file and the first bad record."""
    rec, idx = _resolve(os.fspath(path))
    reader = MXIndexedRecordIO(idx, rec, "r")
    try:
        out: Dict[str, Any] = {"rec": rec, "idx": idx, "bytes": os.path.getsize(rec),
                               "records": len(reader.keys)}
        head = unpack(reader.read_idx(0))[0] if 0 in reader.idx else None
        if head is not None and head.flag > 0:
            out["header"] = {"flag": int(head.flag),
                             "label": [float(x) for x in np.asarray(head.label)]}
        else:
            out["header"] = None
        index = IdentityIndex.from_rec(rec, idx, cache=cache)
        head = header_range(reader)
        bound = class_bound(rec, head)
        out["num_classes"] = {"value": bound.num_classes, "source": bound.source}
        counts = index.counts
        out.update(identities=index.num_identities, images=index.num_images,
                   dataset_positions=index.num_positions, index_source=index.source)
        if index.num_identities:
            c = int(np.argmax(index.identity_labels))
            key = int(index.record_ids(index.positions(c)[:1])[0])
            check_label(float(index.identity_labels[c]), bound, rec, key)
            out["label_range"] = [int(index.identity_labels.min()),
                                  int(index.identity_labels.max())]
            out["images_per_identity"] = {"min": int(counts.min()),
                                          "median": float(np.median(counts)),
                                          "max": int(counts.max())}
        if index.num_images:
            first = int(index.record_ids(index.gather(np.array([0])))[0])
            _, img = read_image_record(reader, first)
            out["image_size"] = [int(img.shape[1]), int(img.shape[0]), int(img.shape[2])]
        if verify:
            out["records_in_rec"] = reader.check_coverage(full=True)
            keys = dataset_record_ids(reader, head)
            ranges = _header_identities(rec, idx, head)
            claimed = None if ranges is None else ranges.labels()  # identity per position
            bar = progress_bar(len(keys), "verify", progress)
            for i, k in enumerate(keys.tolist()):
                label, _ = read_image_record(reader, k)
                c = check_label(label, bound, rec, k, i)
                if ranges is not None:
                    _check_identity(ranges, claimed, rec, head, k, i, c)
                bar.update(1)
            bar.close()
            out["verified"] = int(len(keys))
        return out
    finally:
        reader.close()


def format_summary(s: Dict[str, Any]) -> str:
    """Human-readable lines of an :func:`inspect_rec` summary."""
    lines = [f"file:        {s['rec']} ({s['bytes']:,} bytes, {s['records']:,} records)"]
    h = s["header"]
    lines.append("header:      " + (f"flag={h['flag']} label={h['label']} (InsightFace identity "
                                     f"ranges)" if h else "none (labels scanned)"))
    lines.append(f"identities:  {s['identities']:,}")
    lines.append(f"images:      {s['images']:,} (dataset positions {s['dataset_positions']:,})")
    if "label_range" in s:
        lo, hi = s["label_range"]
        ipi = s["images_per_identity"]
        lines.append(f"labels:      {lo} .. {hi}")
        lines.append(f"per identity: min {ipi['min']}, median {ipi['median']:g}, max {ipi['max']}")
    if "image_size" in s:
        w, h_, c = s["image_size"]
        lines.append(f"image size:  {w}x{h_}x{c} (first image)")
    nc = s.get("num_classes")
    if nc:
        lines.append(f"classes:     {nc['value']:,} ({nc['source']})" if nc["value"] is not None
                     else f"classes:     unknown ({nc['source']})")
    if "verified" in s:
        lines.append(f"verified:    {s['verified']:,} images decode, labels in range; the .idx "
                     f"indexes all {s['records_in_rec']:,} records")
    lines.append(f"index:       {s['index_source']}")
    return "\n".join(lines)
