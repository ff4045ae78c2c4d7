"""Neighbour search of the hard sampler: time and peak memory of the tiled top-k over class centres.

    PYTHONPATH=. python benchmarks/bench_neighbours.py                         # 93k and 2M x 512, CPU
    PYTHONPATH=. python benchmarks/bench_neighbours.py --device cuda --dtype float16
    PYTHONPATH=. python benchmarks/bench_neighbours.py --classes 20000 --rows 0  # quick, all rows

Each configuration runs in its own process (so the peak memory is its own). The search's cost is
linear in the query rows, so ``--rows R`` times R query rows against all N centres and scales the
time by N / R ("full" column); ``--rows 0`` searches every row. Peak memory is what the search
adds on top of the centres themselves: peak RSS minus RSS after the centres exist (CPU), or
``torch.cuda.max_memory_allocated`` minus the centres' bytes (CUDA). The last column: the
refresh interval at which the full search costs 1% of ``--step-seconds`` per step when ``--world`` ranks share the search (the recipe's hook gives
each rank a slice of the rows). ``--plan-only``: the planning cost of one step of
``HardPKSampler`` (P x world = 32 x 8 identities, a random neighbour table), instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from otface_plugin.data.neighbours import DEFAULT_CHUNK, topk_cosine  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(classes: int, dim: int, chunk: tuple, rows: int, device: str, dtype: str, k: int) -> dict:
    """One configuration, in this process."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    centres = torch.randn(classes, dim, device=device, dtype=dt if device == "cuda" else torch.float32)
    rows = classes if rows <= 0 else min(rows, classes)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = centres.numel() * centres.element_size()
    else:
        base = rss_bytes()
    start = time.perf_counter()
    topk_cosine(centres, k, rows=(0, rows), chunk_rows=chunk[0], chunk_cols=chunk[1], dtype=dt)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"classes": classes, "dim": dim, "chunk": f"{chunk[0]}x{chunk[1]}", "device": device,
            "dtype": dtype, "rows": rows, "seconds": seconds, "full_seconds": seconds * classes / rows,
            "peak_mb": peak / 2**20, "centres_mb": classes * dim * dt.itemsize / 2**20}


def plan_step_ms(identities: int, p: int = 32, world: int = 8, steps: int = 201) -> float:
    """Milliseconds to plan one step of HardPKSampler with a neighbour table (the loader thread's
    cost per step; done once per step, not per refresh)."""
    from otface_plugin.data import HardPKSampler, IdentityIndex

    starts = 1 + 21 * np.arange(identities)
    index = IdentityIndex.from_ranges(starts, starts + 21)
    s = HardPKSampler(index, batch_size=p * 4, num_replicas=world, rank=0, num_image=p * 4 * world * steps)
    rng = np.random.default_rng(0)
    table = rng.integers(0, identities, size=(identities, s.table_width))
    s.update_neighbours(table)
    plan = s._steps(0, table, None)
    next(plan)  # the epoch's set-up (per-identity arrays, first permutation) is not a step's cost
    start = time.perf_counter()
    for _ in plan:
        pass
    return (time.perf_counter() - start) / (steps - 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[93_000, 2_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", default=f"{DEFAULT_CHUNK[0]}x{DEFAULT_CHUNK[1]}", help="rows x cols of a tile")
    ap.add_argument("--rows", type=int, default=4096, help="query rows timed (0: all), time scaled to all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float16/bfloat16 on cuda)")
    ap.add_argument("--k", type=int, default=12, help="neighbours kept (HardPKSampler: 4 x neighbours)")
    ap.add_argument("--step-seconds", type=float, default=0.5, help="training step time for the 1%% interval")
    ap.add_argument("--world", type=int, default=8, help="ranks sharing the search (the hook splits the rows)")
    ap.add_argument("--plan-only", action="store_true", help="only the per-step planning cost")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    chunk = tuple(int(x) for x in args.chunk.split("x"))
    if args.plan_only:
        print("| identities | HardPKSampler plan per step (world 8 x P 32) |\n|---|---|")
        for classes in args.classes:
            print(f"| {classes:,} | {plan_step_ms(classes):.2f} ms |", flush=True)
        return
    if args.one:
        print(json.dumps(one(args.classes[0], args.dim, chunk, args.rows, args.device, args.dtype, args.k)))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# neighbour search, {args.device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, k={args.k}\n")
    print("| classes | D | chunk | dtype | rows timed | time (rows timed) | time (all rows) | "
          "peak memory over the centres | centres | refresh interval for 1% "
          f"(world {args.world}, {args.step_seconds} s steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        cmd = [sys.executable, __file__, "--one", "--classes", str(classes), "--dim", str(args.dim),
               "--chunk", args.chunk, "--rows", str(args.rows), "--device", args.device,
               "--dtype", args.dtype, "--k", str(args.k)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        interval = r["full_seconds"] / args.world / (0.01 * args.step_seconds)
        print(f"| {classes:,} | {args.dim} | {r['chunk']} | {r['dtype']} | {r['rows']:,} | {r['seconds']:.2f} s | "
              f"{r['full_seconds']:.1f} s | {r['peak_mb']:.0f} MB | {r['centres_mb']:.0f} MB | "
              f"{interval:,.0f} steps |", flush=True)


if __name__ == "__main__":
    main()
