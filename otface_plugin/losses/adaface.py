"""AdaFace: a margin that adapts to the image quality read off the feature norm.

Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022
(arXiv:2204.00964). Each sample's norm ``||z||`` is standardised with running batch statistics
and scaled by ``h`` into ``g = clip(h (||z|| - mu) / (sigma + eps), -1, 1)``; the target logit
becomes ``cos(clip(theta - m g, eps, pi - eps)) - (m + m g)``, all logits times ``s``.

Conventions follow the authors' ``head.py`` (mk-minchul/AdaFace): cosines clamped to
``[-1 + 1e-3, 1 - 1e-3]``; norms clipped to [1e-3, 100] and detached; the running mean/std
(initial 20 and 100; unbiased std) move by ``t_alpha`` *before* they standardise the current
batch (here only in training mode; the authors' head updates in eval mode too); gradients are exact (through acos/cos of every logit). Their unused ``t`` buffer is left
out.

Ranks: in the recipe the statistics are taken over the gathered batch (every rank's norms,
gathered in PartialFC_V2's order), so every rank computes the same buffers without further
communication; this equals the authors' head applied to the whole global batch.
"""
from __future__ import annotations

import math

import torch

from otface_plugin.losses.head import MarginHead, check_number, register_head

__all__ = ["AdaFaceMargin"]

EPS = 1e-3


@register_head("adaface")
class AdaFaceMargin(MarginHead):
    needs_norms = True
    paper = "Kim et al., CVPR 2022 (arXiv:2204.00964)"
    verified = ("loss and input/weight gradients = a reference written after the authors' head.py, "
                "5 steps incl. running mean/std, 1e-5; PartialFC_V2 (2 gloo ranks, sample_rate 0.5) = standalone; "
                "patched recipe, 2 CPU processes, 32 steps + resume")

    def __init__(self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01) -> None:
        super().__init__()
        self.m = check_number("adaface", "m", m, 0.0)
        self.h = check_number("adaface", "h", h, 0.0)
        self.s = check_number("adaface", "s", s, 0.0, low_open=True)
        self.t_alpha = check_number("adaface", "t_alpha", t_alpha, 0.0, high=1.0)
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels, rows, cols = self.targets(labels)
        norms = self.check_norms(cosine.shape[0]).clamp(0.001, 100)
        with torch.no_grad():
            # the unbiased std of fewer than 2 norms is NaN, and would stay in the buffers for good
            if self.training and norms.numel() >= 2:
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.std())
            scaler = ((norms - self.batch_mean) / (self.batch_std + EPS) * self.h).clamp(-1, 1)
        cosine = cosine.clamp(-1 + EPS, 1 - EPS)
        theta = torch.acos(cosine)
        g = scaler[rows].to(cosine.dtype)
        arc = torch.zeros_like(cosine).index_put((rows, cols), -self.m * g)
        add = torch.zeros_like(cosine).index_put((rows, cols), self.m + self.m * g)
        return (torch.cos((theta + arc).clamp(EPS, math.pi - EPS)) - add) * self.s

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, s={self.s}, t_alpha={self.t_alpha}"
