"""How much of the gradient the OT term gives the features it reads, and a lambda that follows
a target share.

The OT term reads a feature tensor ``F`` (the backbone's last conv stage, a ViT's tokens, or
the embeddings); the margin part reaches ``F`` through the rest of the backbone. The probe hands
the OT term a view of ``F``: a hook on the view sees only ``d(lambda L_OT)/dF``, a hook on ``F``
sees the sum, and their difference is the margin part's gradient. No second forward, no host
synchronisation: three reductions over ``F``'s gradient, written into a device buffer.

The share is ``||d(lambda L_OT)/dF|| / ||d L_margin/dF||``; because the OT gradient is linear in
lambda, the share at lambda = 1 is ``share / lambda``, and the lambda that gives a target share
is ``target / (share / lambda)``. :func:`adapt_lambda` moves lambda there in log space, a step of
``rate`` at a time, bounded, from statistics averaged over the ranks, so every rank keeps the same
lambda without a host sync.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import distributed

__all__ = ["STATS", "GradShareProbe", "share_and_cosine", "adapt_lambda"]

# grad_stats buffer layout: ||g_ot||, ||g_margin||, <g_ot, g_margin>, lambda of that step
STATS = ("ot_norm", "margin_norm", "dot", "lambda")


class GradShareProbe:
    """Splits the gradient at ``F`` into its OT part and the rest, into ``stats`` (a (4,) float
    buffer, layout :data:`STATS`, that the owning loss binds), during the backward of the step
    that called :meth:`attach`; and steers ``lambda_ot="auto"`` from those statistics.

    Its options are the OTFace loss's ``probe_options``: ``measure_grad_share`` (False: no hooks,
    the share is NaN; ``lambda_ot="auto"`` needs it), ``lambda_range`` (the adaptive lambda's
    bounds) and ``lambda_rate`` (the fraction of the way, in log space, it moves each step).
    """

    def __init__(self, measure_grad_share: bool = True, lambda_range: Tuple[float, float] = (0.01, 1000.0),
                 lambda_rate: float = 0.05) -> None:
        if not isinstance(measure_grad_share, bool):
            raise ValueError(f"OTFace option measure_grad_share must be true or false, got {measure_grad_share!r}")
        if isinstance(lambda_rate, bool) or not isinstance(lambda_rate, (int, float)) \
                or not (0 < lambda_rate <= 1):
            raise ValueError(f"OTFace option lambda_rate must be in (0, 1], got {lambda_rate!r}")
        if not (isinstance(lambda_range, (tuple, list)) and len(lambda_range) == 2):
            raise ValueError(f"OTFace option lambda_range must be a pair (low, high), got {lambda_range!r}")
        for v in lambda_range:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"OTFace option lambda_range must be > 0, got {lambda_range!r}")
        if lambda_range[0] > lambda_range[1]:
            raise ValueError(f"OTFace option lambda_range must have low <= high, got {lambda_range!r}")
        self.measure_grad_share = measure_grad_share
        self.lambda_range = (float(lambda_range[0]), float(lambda_range[1]))
        self.lambda_rate = float(lambda_rate)
        self.stats: Optional[torch.Tensor] = None
        self._ot_grad = None

    def adapt(self, lam: torch.Tensor, target: float) -> None:
        """Move the adaptive ``lam`` (in place) towards ``target`` share, from the last step's stats."""
        adapt_lambda(lam, self.stats, target, self.lambda_rate, self.lambda_range)

    def attach(self, features: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The tensor the OT term should read instead of ``features`` (a view, same values).
        Without autograd (eval, ``no_grad``) nothing is attached and ``features`` comes back."""
        if not (torch.is_grad_enabled() and features.requires_grad):
            return features
        self._ot_grad = None
        self.stats.zero_()
        self.stats[3].copy_(lam.detach())
        view = features.view_as(features)
        view.register_hook(self._keep_ot_grad)
        features.register_hook(self._split)
        return view

    def _keep_ot_grad(self, grad: torch.Tensor) -> None:
        self._ot_grad = grad

    def _split(self, grad: torch.Tensor) -> None:
        # runs after the view's hook: F's gradient is complete only once the view's has arrived
        total = grad.detach().float().flatten()
        ot = self._ot_grad
        self._ot_grad = None
        with torch.no_grad():
            if ot is None:  # no OT gradient reached F (no triplet in the batch)
                self.stats[:3].copy_(torch.stack([total.new_zeros(()), total.norm(), total.new_zeros(())]))
                return
            ot = ot.detach().float().flatten()
            margin = total - ot
            self.stats[:3].copy_(torch.stack([ot.norm(), margin.norm(), torch.dot(ot, margin)]))


def share_and_cosine(stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(share, cosine) of one step's statistics; NaN share when nothing was measured (the
    margin gradient is 0: no backward yet), cosine 0 when one of the two gradients is 0."""
    ot, margin, dot = stats[0], stats[1], stats[2]
    share = torch.where(margin > 0, ot / margin.clamp(min=1e-30), torch.full_like(ot, math.nan))
    cos = torch.where((ot > 0) & (margin > 0), dot / (ot * margin).clamp(min=1e-30), torch.zeros_like(ot))
    return share, cos


def adapt_lambda(lam: torch.Tensor, stats: torch.Tensor, target: float, rate: float,
                 bounds: Tuple[float, float]) -> None:
    """One in-place update of the adaptive ``lam`` (0-d) from the last step's ``stats``.

    Each rank contributes ``log(share / lambda_used)`` when its step measured a finite, positive
    OT share; the mean over the contributing ranks (an all-reduce, no host sync) sets the
    lambda that would give ``target``, and ``log lam`` moves ``rate`` of the way there, within
    ``bounds``. A step in which no rank measured a share leaves ``lam`` as it was.
    """
    share, _ = share_and_cosine(stats)
    used = stats[3]
    valid = torch.isfinite(share) & (share > 0) & (used > 0)
    unit_log = torch.where(valid, torch.log(share.clamp(min=1e-30)) - torch.log(used.clamp(min=1e-30)),
                           torch.zeros_like(share))
    summary = torch.stack([unit_log, valid.float()])
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        distributed.all_reduce(summary)
    count = summary[1]
    mean_unit_log = summary[0] / count.clamp(min=1.0)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    wanted = (math.log(target) - mean_unit_log).clamp(lo, hi)
    current = torch.log(lam.float())
    moved = (current + rate * (wanted - current)).clamp(lo, hi)
    lam.copy_(torch.where(count > 0, torch.exp(moved), lam.float()).to(lam.dtype))
