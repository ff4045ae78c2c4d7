"""Losses: margin heads, their one standalone loss and the OTFace loss (registered with the loss registry)."""
from otface_plugin.losses.head import (
    HEADS,
    MARGIN_PRESETS,
    MarginHead,
    MarginSoftmaxLoss,
    build_margin,
    heads_table,
    margin_head,
    plugin_heads,
)
from otface_plugin.losses.margin import ArcFaceMargin, CombinedMargin, CosFaceMargin, margin_logits
from otface_plugin.losses.adaface import AdaFaceMargin
from otface_plugin.losses.curricularface import CurricularFaceMargin
from otface_plugin.losses.elasticface import ElasticArcFaceMargin, ElasticCosFaceMargin
from otface_plugin.losses.otface import OTFaceLoss, OTFaceTerm

__all__ = [
    "HEADS", "MARGIN_PRESETS", "MarginHead", "MarginSoftmaxLoss", "build_margin", "heads_table", "margin_head",
    "plugin_heads", "margin_logits", "ArcFaceMargin", "CombinedMargin", "CosFaceMargin", "AdaFaceMargin",
    "CurricularFaceMargin", "ElasticArcFaceMargin", "ElasticCosFaceMargin", "OTFaceLoss", "OTFaceTerm",
]
