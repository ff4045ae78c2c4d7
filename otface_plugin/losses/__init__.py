"""Losses: margin softmax heads and the OTFace loss (registered with the loss registry)."""
from otface_plugin.losses.margin import (
    MARGIN_PRESETS,
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    MarginSoftmaxLoss,
    margin_logits,
)
from otface_plugin.losses.otface import OTFaceLoss, OTFaceTerm

__all__ = [
    "MARGIN_PRESETS", "ArcFaceLoss", "CombinedMarginLoss", "CosFaceLoss", "MarginSoftmaxLoss",
    "margin_logits", "OTFaceLoss", "OTFaceTerm",
]
