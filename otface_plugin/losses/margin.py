"""Margin-based softmax heads: ArcFace, CosFace (AM-Softmax) and the combined margin.

The target logit ``cos(theta)`` of each sample becomes ``cos(m1 * theta + m2) - m3`` and all
logits are scaled by ``s`` (InsightFace's combined margin; ArcFace: Deng et al. 2019,
arXiv:1801.07698; CosFace: Wang et al. 2018, arXiv:1801.09414).

Gradients follow arcface_torch's ``CombinedMarginLoss``: its angular branch (``m1 != 1`` or
``m2 != 0``) edits the logits in place under ``no_grad``, so the gradient with respect to the
cosines is the gradient with respect to the margined logits (a straight-through estimate);
the additive ``m3`` is differentiated normally. ``grad="exact"`` differentiates the formula
instead.
"""
from __future__ import annotations

import math

import torch

from otface_plugin.losses.head import (  # noqa: F401  (MarginSoftmaxLoss: its import path before it served every head)
    MARGIN_PRESETS, MarginHead, MarginSoftmaxLoss, check_number, margin_triple, register_head)

__all__ = ["margin_logits", "margin_triple", "CombinedMargin", "ArcFaceMargin", "CosFaceMargin", "MARGIN_PRESETS"]

GRADS = ("recipe", "exact")


def margin_logits(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
    grad: str = "recipe",
) -> torch.Tensor:
    """Scaled logits with the combined margin on each sample's target class.

    Args:
        cosine: (B, C) cosine similarities in [-1, 1].
        labels: (B,) target classes; ``-1`` marks a sample without a target here (as in
            PartialFC, where a class may live on another rank).
        interclass_filtering_threshold: zero non-target cosines above it, as the recipe does
            to suppress likely label noise (0 disables).
        grad: ``"recipe"`` (straight-through on the angular margin, like arcface_torch) or
            ``"exact"``.
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be 'recipe' or 'exact', got {grad!r}")
    labels = labels.view(-1).long()
    rows = torch.nonzero(labels != -1, as_tuple=False).view(-1)
    cols = labels[rows]

    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            dirty = (cosine > interclass_filtering_threshold).to(cosine.dtype)
            dirty[rows, cols] = 0
        cosine = cosine * (1 - dirty)

    target = cosine[rows, cols]
    if m1 != 1.0 or m2 != 0.0:
        if grad == "exact":
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            new_target = torch.cos(m1 * theta + m2)
        else:
            with torch.no_grad():
                new_target = torch.cos(m1 * torch.acos(target) + m2)
            new_target = target + (new_target - target).detach()
    else:
        new_target = target
    new_target = new_target - m3

    out = cosine.index_put((rows, cols), new_target)
    return out * s


@register_head("combined")
class CombinedMargin(MarginHead):
    """The combined margin with explicit ``m1, m2, m3`` (arcface_torch's ``margin_list``); its
    options are :func:`margin_logits`' (a test checks that the two signatures agree)."""

    in_recipe = True
    paper = ("InsightFace's combined margin; ArcFace: Deng et al. 2019 (arXiv:1801.07698), "
             "CosFace: Wang et al. 2018 (arXiv:1801.09414)")
    verified = ("logits and their gradient = arcface_torch's CombinedMarginLoss (the recipe's own module), "
                "ArcFace and CosFace margins; logits = a reference derivation of the formula")
    name = "combined"

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0, grad: str = "recipe") -> None:
        super().__init__()
        self.s = check_number(self.name, "s", s, 0.0, low_open=True)
        self.m1 = check_number(self.name, "m1", m1, 0.0, low_open=True)
        self.m2 = check_number(self.name, "m2", m2, 0.0)
        self.m3 = check_number(self.name, "m3", m3, 0.0)
        if self.m2 >= math.pi / 2:
            raise ValueError(f"{self.name} option m2 must be < pi/2, got {m2!r}")
        self.interclass_filtering_threshold = check_number(
            self.name, "interclass_filtering_threshold", interclass_filtering_threshold)
        if grad not in GRADS:
            raise ValueError(f"{self.name} option grad must be one of {GRADS}, got {grad!r}")
        self.grad = grad

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_logits(cosine, labels, self.s, self.m1, self.m2, self.m3,
                             self.interclass_filtering_threshold, self.grad)

    def extra_repr(self) -> str:
        return f"s={self.s}, m=({self.m1}, {self.m2}, {self.m3})"


@register_head("arcface")
class ArcFaceMargin(CombinedMargin):
    """ArcFace: additive angular margin ``cos(theta + margin)``."""

    name = "arcface"

    def __init__(self, s: float = 64.0, margin: float = MARGIN_PRESETS["arcface"][1],
                 interclass_filtering_threshold: float = 0.0, grad: str = "recipe") -> None:
        super().__init__(s, 1.0, margin, 0.0, interclass_filtering_threshold, grad)


@register_head("cosface")
class CosFaceMargin(CombinedMargin):
    """CosFace / AM-Softmax: additive cosine margin ``cos(theta) - margin``."""

    name = "cosface"

    def __init__(self, s: float = 64.0, margin: float = MARGIN_PRESETS["cosface"][2],
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(s, 1.0, 0.0, margin, interclass_filtering_threshold)
