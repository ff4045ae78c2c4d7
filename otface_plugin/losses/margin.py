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
from numbers import Real
from typing import Any, Tuple

import torch
from torch.nn import functional as F

from otface_plugin.registry import register_loss

__all__ = ["margin_logits", "margin_triple", "MarginSoftmaxLoss", "ArcFaceLoss", "CosFaceLoss", "MARGIN_PRESETS"]

# (m1, m2, m3) as arcface_torch's config.margin_list.
MARGIN_PRESETS = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
}


def margin_triple(value: Any, what: str = "margin") -> Tuple[float, float, float]:
    """``(m1, m2, m3)`` of a preset name (:data:`MARGIN_PRESETS`) or of three numbers; else a
    ValueError naming ``what`` (OTFaceLoss's ``margin``, a config's ``margin_list``, ...)."""
    if isinstance(value, str):
        if value not in MARGIN_PRESETS:
            from otface_plugin.losses.head import HEADS  # imported here: head.py builds on this module

            raise ValueError(f"{what} must be arcface, cosface, a margin head ({', '.join(sorted(HEADS))}) "
                             f"or [m1, m2, m3], got {value!r}")
        return MARGIN_PRESETS[value]
    try:
        triple = tuple(value)
    except TypeError:
        triple = ()
    if len(triple) != 3 or not all(isinstance(m, Real) and not isinstance(m, bool) for m in triple):
        raise ValueError(f"{what} must be three numbers [m1, m2, m3], got {value!r}")
    m1, m2, m3 = (float(m) for m in triple)
    return m1, m2, m3


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
    if grad not in ("recipe", "exact"):
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


class MarginSoftmaxLoss(torch.nn.Module):
    """Normalised linear classifier + combined-margin softmax cross entropy.

    For training outside arcface_torch; inside the recipe, PartialFC_V2 plays this role. After
    each forward, ``last_cosine`` holds the (detached) cosine logits, used by the
    ``misclassified`` triplet mode.
    """

    # margin_logits' options and defaults, as nn.CrossEntropyLoss mirrors F.cross_entropy
    # (tests/losses/test_losses.py checks that the two signatures agree)
    def __init__(self, num_classes: int, embedding_size: int = 512, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, interclass_filtering_threshold: float = 0.0,
                 grad: str = "recipe") -> None:
        super().__init__()
        _check_margins(num_classes, embedding_size, s, m1, m2, m3)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.grad = grad
        # Same initialisation as PartialFC_V2.
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.last_cosine: torch.Tensor | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
            cosine = cosine.clamp(-1, 1)
            self.last_cosine = cosine.detach()
            logits = margin_logits(
                cosine, labels, self.s, self.m1, self.m2, self.m3,
                self.interclass_filtering_threshold, self.grad,
            )
            labels = labels.view(-1).long()
            # the mean over the labelled samples, 0 (not 0/0 = NaN) when all are -1 or the batch is empty
            total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
            return total / (labels != -1).sum().clamp(min=1)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"num_classes={c}, embedding_size={d}, s={self.s}, m=({self.m1}, {self.m2}, {self.m3})"


@register_loss("combined")
class CombinedMarginLoss(MarginSoftmaxLoss):
    """Combined margin with explicit ``m1, m2, m3`` (arcface_torch's ``margin_list``)."""


@register_loss("arcface")
class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace: additive angular margin ``cos(theta + m)``, m = 0.5, s = 64."""

    def __init__(self, num_classes: int, embedding_size: int = 512, s: float = 64.0, margin: float = 0.5,
                 interclass_filtering_threshold: float = 0.0, grad: str = "recipe") -> None:
        super().__init__(num_classes, embedding_size, s, 1.0, margin, 0.0, interclass_filtering_threshold, grad)


@register_loss("cosface")
class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace / AM-Softmax: additive cosine margin ``cos(theta) - m``, m = 0.4, s = 64."""

    def __init__(self, num_classes: int, embedding_size: int = 512, s: float = 64.0, margin: float = 0.4,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(num_classes, embedding_size, s, 1.0, 0.0, margin, interclass_filtering_threshold)


def _check_margins(num_classes, embedding_size, s, m1, m2, m3):
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (isinstance(embedding_size, int) and embedding_size >= 1):
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    for name, v in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)):
        if not math.isfinite(float(v)):
            raise ValueError(f"margin option {name} must be finite, got {v!r}")
    if s <= 0:
        raise ValueError(f"scale s must be > 0, got {s!r}")
    if m1 <= 0 or m2 < 0 or m3 < 0 or m2 >= math.pi / 2:
        raise ValueError(f"margins must satisfy m1 > 0, 0 <= m2 < pi/2, m3 >= 0; got m1={m1}, m2={m2}, m3={m3}")
