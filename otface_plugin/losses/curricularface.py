"""CurricularFace: hard negatives weighted by a running estimate of training progress.

Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition",
CVPR 2020 (arXiv:2004.00288). The target logit is ArcFace's ``cos(theta + m)`` (with the
``cos(theta) - m sin(m)`` fallback past ``pi - m``); a non-target cosine above it (a hard
negative) becomes ``cos * (t + cos)``, where ``t`` is an exponential moving average (0.01) of
the batch's mean target cosine, kept as a buffer.

Conventions follow the authors' ``head/metrics.py`` (HuangYG123/CurricularFace): cosines
clamped to [-1, 1]; ``t`` starts at 0 and is updated from the current batch *before* it
modulates the negatives; ``t`` and the hard-negative mask carry no gradient; the margin's
gradient is exact.

Ranks: in the recipe each rank holds one slice of the classes, so each sample's target cosine
lives on one rank; the per-rank targets are all-reduced (B values per step) so that every rank
masks its negatives against the right ``cos(theta + m)`` and updates ``t`` from the mean over
the whole gathered batch: ``t`` is identical on all ranks, and the loss equals the authors' head
on the global batch.
"""
from __future__ import annotations

import math

import torch

from otface_plugin.losses.head import MarginHead, check_number, register_head

__all__ = ["CurricularFaceMargin"]

MOMENTUM = 0.01  # the authors' fixed EMA rate for t


@register_head("curricularface")
class CurricularFaceMargin(MarginHead):
    paper = "Huang et al., CVPR 2020 (arXiv:2004.00288)"
    verified = ("loss and input/weight gradients = a reference written after the authors' metrics.py, "
                "5 steps incl. t, 1e-5; PartialFC_V2 (2 gloo ranks, sample_rate 0.5) = standalone; "
                "patched recipe under OTFace, 2 CPU processes, 32 steps + resume")

    def __init__(self, m: float = 0.5, s: float = 64.0) -> None:
        super().__init__()
        self.m = check_number("curricularface", "m", m, 0.0, high=math.pi / 2)
        self.s = check_number("curricularface", "s", s, 0.0, low_open=True)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.zeros(1))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels, rows, cols = self.targets(labels)
        cosine = cosine.clamp(-1, 1)
        target_all, has = self.global_targets(cosine, rows, cols)
        with torch.no_grad():
            sin_all = torch.sqrt(1.0 - target_all ** 2)
            cos_theta_m_all = target_all * self.cos_m - sin_all * self.sin_m
            mask = cosine > cos_theta_m_all.view(-1, 1)
            mask &= has.view(-1, 1)
            if self.training:  # no host sync: a batch without targets leaves t as it is
                count = has.sum()
                mean = (target_all * has).sum() / count.clamp(min=1)
                self.t.copy_(torch.where(count > 0, self.t * (1 - MOMENTUM) + MOMENTUM * mean, self.t))
        target = cosine[rows, cols]
        cos_theta_m = target * self.cos_m - torch.sqrt(1.0 - target ** 2) * self.sin_m
        final = torch.where(target > self.threshold, cos_theta_m, target - self.mm)
        t = self.t.to(cosine.dtype)
        out = torch.where(mask, cosine * (t + cosine), cosine)
        return out.index_put((rows, cols), final) * self.s

    def extra_repr(self) -> str:
        return f"m={self.m}, s={self.s}"
