"""Data benchmarks: RecordIO read rate (plugin vs mxnet), identity index build, sampler plan.

Runs in either environment and prints one markdown table:
- the plugin's dev env (numpy 2, torch): plugin reader rows, index and sampler rows;
- the mxnet env of .ci/mxnet_compat.sh (mxnet 1.9.1, numpy 1.23.5, no torch): plugin and mxnet
  reader rows side by side, plus the index rows (the sampler row needs torch).

    PYTHONPATH=. python benchmarks/bench_data.py                      # defaults below
    PYTHONPATH=. python benchmarks/bench_data.py --quick              # small sizes, seconds

Index figures: in-memory builds for ``--identities`` x ``--images-per-identity`` (WebFace42M:
2M x 21 = 42M images) from header ranges and from a label array, and an on-disk
``IdentityIndex.from_rec`` for ``--disk-identities`` x 21 records (tiny payloads) so the file
parsing cost (``.idx`` parse, vectorised record reads) is measured too. Peak memory is the
tracemalloc peak, which counts numpy buffers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import tracemalloc
import warnings
from typing import Callable, List, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from otface_plugin.data import recordio as R  # noqa: E402
from otface_plugin.data.identity_index import IdentityIndex  # noqa: E402
from otface_plugin.data.imagecodec import decode_image, encode_image  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import mxnet as mx
    except ImportError:
        mx = None

Row = Tuple[str, str, str, str]


def measure(fn: Callable, repeat: int = 1):
    """(best seconds, tracemalloc peak bytes of the best run, result)."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeat):
        tracemalloc.start()
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if dt < best:
            best, peak = dt, p
    return best, peak, out


def fmt_mb(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


# ------------------------------------------------------------------ reader


def make_image_rec(d: str, n: int) -> List[bytes]:
    """n records of realistic 112x112 q95 JPEG faces-like payloads (smooth noise)."""
    rng = np.random.default_rng(0)
    payloads = []
    for i in range(64):
        base = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(base, 8, 0), 8, 1)
        payloads.append(encode_image(img, ".jpg", 95))
    w = R.MXIndexedRecordIO(os.path.join(d, "b.idx"), os.path.join(d, "b.rec"), "w")
    for k in range(n):
        w.write_idx(k, R.pack(R.IRHeader(0, float(k % 1000), k, 0), payloads[k % 64]))
    w.close()
    return payloads


def bench_readers(n: int, rows: List[Row]) -> None:
    with tempfile.TemporaryDirectory() as d:
        make_image_rec(d, n)
        rec, idx = os.path.join(d, "b.rec"), os.path.join(d, "b.idx")
        size = os.path.getsize(rec)
        order = np.random.default_rng(1).permutation(n).tolist()
        readers = [("plugin", lambda: R.MXIndexedRecordIO(idx, rec, "r"), R.unpack,
                    lambda b: decode_image(b))]
        if mx is not None:
            readers.append(("mxnet 1.9.1",
                            lambda: mx.recordio.MXIndexedRecordIO(idx, rec, "r"),
                            mx.recordio.unpack, lambda b: mx.image.imdecode(b).asnumpy()))
        rates = {}
        for name, opener, unpack, decode in readers:
            r = opener()
            t = time.perf_counter()
            for k in order:
                unpack(r.read_idx(k))
            rnd = n / (time.perf_counter() - t)
            r.close()
            t = time.perf_counter()
            r = opener()
            for _ in range(n):
                r.read()
            seq = n / (time.perf_counter() - t)
            r.close()
            r = opener()
            m = min(n, 5000)
            t = time.perf_counter()
            for k in order[:m]:
                decode(unpack(r.read_idx(k))[1])
            dec = m / (time.perf_counter() - t)
            r.close()
            rates[name] = (rnd, seq, dec)
            rows.append((f"read_idx + unpack, random order ({n:,} records, "
                         f"{size / n / 1024:.1f} KiB each)", name, f"{rnd:,.0f} rec/s", ""))
            rows.append(("sequential read()", name, f"{seq:,.0f} rec/s", ""))
            rows.append(("read_idx + unpack + decode to RGB (112x112 JPEG)", name,
                         f"{dec:,.0f} rec/s", ""))
        if "mxnet 1.9.1" in rates:
            p, m_ = rates["plugin"], rates["mxnet 1.9.1"]
            rows.append(("ratio plugin / mxnet (random, sequential, decode)", "",
                         " / ".join(f"{a / b:.2f}x" for a, b in zip(p, m_)), ""))


# ------------------------------------------------------------------ identity index


def bench_index(n_id: int, per: int, rows: List[Row]) -> IdentityIndex:
    n = n_id * per
    starts = 1 + per * np.arange(n_id, dtype=np.int64)
    ends = starts + per
    dt, peak, index = measure(lambda: IdentityIndex.from_ranges(starts, ends), repeat=3)
    rows.append((f"IdentityIndex.from_ranges, {n_id:,} identities x {per} = {n:,} images",
                 "plugin", f"{dt * 1e3:,.1f} ms", fmt_mb(peak)))
    labels = np.repeat(np.arange(n_id, dtype=np.int64), per)
    dt, peak, _ = measure(lambda: IdentityIndex.from_labels(labels))
    rows.append((f"IdentityIndex.from_labels (label scan result), {n:,} labels, file order",
                 "plugin", f"{dt:,.2f} s", fmt_mb(peak)))
    shuffled = np.random.default_rng(0).permutation(labels)
    dt, peak, _ = measure(lambda: IdentityIndex.from_labels(shuffled))
    rows.append((f"IdentityIndex.from_labels, {n:,} labels, shuffled", "plugin",
                 f"{dt:,.2f} s", fmt_mb(peak)))
    del labels, shuffled
    return index


def write_tiny_insightface_rec(d: str, n_id: int, per: int) -> str:
    """InsightFace layout with 4-byte payloads, written with vectorised numpy (fast)."""
    n = n_id * per
    # image record: 8 framing + 24 IRHeader + 4 payload = 36 bytes; identity/header: 40 bytes
    img = np.zeros(n, dtype=[("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                             ("id", "<u8"), ("id2", "<u8"), ("pay", "<u4")])
    img["magic"], img["lrec"], img["pay"] = R.MAGIC, 28, 0x01020304
    img["label"] = np.repeat(np.arange(n_id, dtype=np.float32), per)
    img["id"] = np.arange(1, n + 1)
    hdr_dt = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
              ("id", "<u8"), ("id2", "<u8"), ("a", "<f4"), ("b", "<f4")]
    ids = np.zeros(n_id + 1, dtype=hdr_dt)
    ids["magic"], ids["lrec"], ids["flag"] = R.MAGIC, 32, 2
    ids["a"][0], ids["b"][0] = n + 1, n + 1 + n_id
    ids["a"][1:] = 1 + per * np.arange(n_id)
    ids["b"][1:] = ids["a"][1:] + per
    rec = os.path.join(d, "train.rec")
    with open(rec, "wb") as f:
        f.write(ids[:1].tobytes())
        f.write(img.tobytes())
        f.write(ids[1:].tobytes())
    offsets = np.r_[0, 40 + 36 * np.arange(n), 40 + 36 * n + 40 * np.arange(n_id)]
    keys = np.arange(n + n_id + 1)
    with open(os.path.join(d, "train.idx"), "w") as f:
        f.write("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())))
    return rec


def bench_index_on_disk(n_id: int, per: int, rows: List[Row]) -> None:
    with tempfile.TemporaryDirectory() as d:
        rec = write_tiny_insightface_rec(d, n_id, per)
        n = n_id * per
        dt, peak, idx = measure(lambda: IdentityIndex.from_rec(rec, cache=False))
        assert idx.num_images == n and idx.source.startswith("header")
        what = f"{n_id:,} x {per} = {n:,} images, {os.path.getsize(rec) / 2 ** 20:,.0f} MiB .rec"
        rows.append((f"IdentityIndex.from_rec via header ranges ({what})", "plugin",
                     f"{dt:,.2f} s", fmt_mb(peak)))
        dt, peak, idx2 = measure(lambda: IdentityIndex.from_rec(rec, use_header=False))
        assert np.array_equal(idx2.counts, idx.counts)
        rows.append(("IdentityIndex.from_rec via label scan, first run (writes cache)", "plugin",
                     f"{dt:,.2f} s", fmt_mb(peak)))
        dt, peak, _ = measure(lambda: IdentityIndex.from_rec(rec, use_header=False))
        rows.append(("IdentityIndex.from_rec via label scan, cached", "plugin",
                     f"{dt:,.2f} s", fmt_mb(peak)))
        t = time.perf_counter()
        R.parse_idx(os.path.join(d, "train.idx"), int)
        rows.append((f"  of which .idx parse ({n + n_id + 1:,} lines)", "plugin",
                     f"{time.perf_counter() - t:,.2f} s", ""))
        idx = os.path.join(d, "train.idx")
        openers = [("plugin", lambda: R.MXIndexedRecordIO(idx, rec, "r"))]
        if mx is not None:
            openers.append(("mxnet 1.9.1", lambda: mx.recordio.MXIndexedRecordIO(idx, rec, "r")))
        for name, opener in openers:  # what every DataLoader process pays at start-up
            dt, peak, r = measure(opener)
            r.close()
            rows.append((f"open MXIndexedRecordIO ({n + n_id + 1:,}-line .idx)", name,
                         f"{dt:,.2f} s", fmt_mb(peak)))


def bench_sampler(index: IdentityIndex, rows: List[Row]) -> None:
    try:
        from otface_plugin.data.sampler import PKSampler
    except ImportError:
        rows.append(("PKSampler epoch plan", "plugin", "skipped (no torch)", ""))
        return
    s = PKSampler(index, batch_size=128, num_instances=4, num_replicas=8, rank=0)
    dt, peak, out = measure(s.epoch_indices)
    rows.append((f"PKSampler.epoch_indices, world 8 x batch 128, {s.steps_per_epoch:,} steps",
                 "plugin", f"{dt:,.2f} s", fmt_mb(peak)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--identities", type=int, default=2_000_000)
    ap.add_argument("--images-per-identity", type=int, default=21)
    ap.add_argument("--disk-identities", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.records, args.identities, args.disk_identities = 2000, 20000, 5000
    rows: List[Row] = []
    bench_readers(args.records, rows)
    if not args.skip_index:
        index = bench_index(args.identities, args.images_per_identity, rows)
        bench_index_on_disk(args.disk_identities, args.images_per_identity, rows)
        bench_sampler(index, rows)
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"mxnet {mx.__version__ if mx else 'not installed'}, {platform.machine()}, "
          f"{os.cpu_count()} cpus")
    print("| what | reader | time / rate | peak memory |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
