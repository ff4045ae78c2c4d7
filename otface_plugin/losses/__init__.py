"""Losses: margin softmax heads and the OTFace loss (registered with the loss registry)."""
from otface_plugin.losses.margin import (
    MARGIN_PRESETS,
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    MarginSoftmaxLoss,
    margin_logits,
)
from otface_plugin.losses.head import HEADS, HeadLoss, MarginHead, build_margin, heads_table
from otface_plugin.losses.adaface import AdaFaceMargin
from otface_plugin.losses.curricularface import CurricularFaceMargin
from otface_plugin.losses.elasticface import ElasticArcFaceMargin, ElasticCosFaceMargin
from otface_plugin.losses.otface import OTFaceLoss, OTFaceTerm

__all__ = [
    "MARGIN_PRESETS", "ArcFaceLoss", "CombinedMarginLoss", "CosFaceLoss", "MarginSoftmaxLoss",
    "margin_logits", "OTFaceLoss", "OTFaceTerm", "HEADS", "HeadLoss", "MarginHead", "build_margin", "heads_table",
    "AdaFaceMargin", "CurricularFaceMargin", "ElasticArcFaceMargin", "ElasticCosFaceMargin",
]
