"""Nearest identities by cosine of their class centres, in tiles: memory bounded by the tile.

``topk_cosine(centres, k)`` returns, for every row, the ``k`` other rows of highest cosine
similarity. The (N, N) similarity matrix is never formed: queries go in chunks of
``chunk_rows``, keys in blocks of ``chunk_cols``, and a running top-k per query is merged block
by block, so the working memory is ``chunk_rows x chunk_cols`` similarities plus the normalised
centres, whatever N is (93k identities of MS1MV3 or 2M of WebFace42M). On a GPU the products
run in fp16/bf16 (``dtype``), on CPU in fp32; the centres are read tile by tile in place
(no normalised copy), so only the tile and the running top-k come on top of them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["topk_cosine", "topk_cosine_sharded", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = (4096, 16384)  # rows x cols: 256 MB of fp32 similarities per tile


def topk_cosine(centres: torch.Tensor, k: int, *, rows: Optional[Tuple[int, int]] = None,
                chunk_rows: int = DEFAULT_CHUNK[0], chunk_cols: int = DEFAULT_CHUNK[1],
                device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine neighbours of rows ``rows = (start, stop)`` (default all) among all rows.

    A row is never its own neighbour. Returns (indices int64, similarities float32), both
    (stop - start, k), on the CPU, best first. ``dtype`` defaults to fp16 on CUDA, fp32 on CPU;
    ties are broken by ``torch.topk``.
    """
    n = centres.shape[0]
    if centres.dim() != 2 or n < 2:
        raise ValueError(f"centres must be (num_classes >= 2, D), got shape {tuple(centres.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} centres, got {k}")
    device = torch.device(device) if device is not None else centres.device
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    start, stop = rows if rows is not None else (0, n)
    centres = centres.detach()
    # inverse norms, computed block by block; rows are normalised tile by tile (before the
    # product, so fp16 cannot overflow), never as a whole copy (4 GB for 2M x 512 in fp32);
    # zero rows (never-trained classes) stay zero
    inv = torch.empty(n, device=device)
    for c0 in range(0, n, chunk_cols):
        block = centres[c0:c0 + chunk_cols].to(device=device, dtype=torch.float32)
        inv[c0:c0 + chunk_cols] = block.norm(dim=1).clamp_min(1e-12).reciprocal()
    out_idx = torch.empty((stop - start, k), dtype=torch.int64)
    out_sim = torch.empty((stop - start, k), dtype=torch.float32)
    for q0 in range(start, stop, chunk_rows):
        q1 = min(q0 + chunk_rows, stop)
        q = _unit(centres, inv, q0, q1, device, dtype)
        best_sim = torch.full((q1 - q0, k), -float("inf"), device=device)
        best_idx = torch.zeros((q1 - q0, k), dtype=torch.int64, device=device)
        for c0 in range(0, n, chunk_cols):
            c1 = min(c0 + chunk_cols, n)
            sim = (q @ _unit(centres, inv, c0, c1, device, dtype).T).float()
            lo, hi = max(q0, c0), min(q1, c1)  # the self-similarity diagonal inside this tile
            if lo < hi:
                d = torch.arange(lo, hi, device=device)
                sim[d - q0, d - c0] = -float("inf")
            kk = min(k, c1 - c0)
            s, i = sim.topk(kk, dim=1)
            merged_sim = torch.cat([best_sim, s], dim=1)
            merged_idx = torch.cat([best_idx, i + c0], dim=1)
            best_sim, pick = merged_sim.topk(k, dim=1)
            best_idx = merged_idx.gather(1, pick)
        out_idx[q0 - start:q1 - start] = best_idx.cpu()
        out_sim[q0 - start:q1 - start] = best_sim.cpu()
    return out_idx, out_sim


def topk_cosine_sharded(centres: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_cosine`'s indices for all rows, each rank of an initialised process group
    searching a contiguous slice of them; the slices are all-gathered, so every rank gets the
    same (N, k) indices (on the CPU). A collective: every rank must call it. Without a process
    group it is ``topk_cosine(centres, k)[0]``."""
    from torch import distributed

    if not (distributed.is_available() and distributed.is_initialized()):
        return topk_cosine(centres, k)[0]
    world, rank = distributed.get_world_size(), distributed.get_rank()
    n = centres.shape[0]
    bounds = [n * r // world for r in range(world + 1)]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    idx, _ = topk_cosine(centres, k, rows=(bounds[rank], bounds[rank + 1]))
    padded = torch.full((max(sizes), k), -1, dtype=torch.int64, device=centres.device)
    padded[:len(idx)] = idx.to(centres.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    distributed.all_gather(parts, padded)
    return torch.cat([p[:m] for p, m in zip(parts, sizes)]).cpu()


def _unit(centres: torch.Tensor, inv: torch.Tensor, a: int, b: int, device, dtype) -> torch.Tensor:
    """Rows a:b of the centres, L2-normalised, in the compute dtype (a tile-sized copy)."""
    return (centres[a:b].to(device=device, dtype=torch.float32) * inv[a:b, None]).to(dtype)
