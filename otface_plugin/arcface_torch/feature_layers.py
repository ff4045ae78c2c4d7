"""Which layer of each arcface_torch backbone the OT term reads (option ``otface.layer`` overrides).

Chosen by the backbone's class, so every ``network`` name that builds it (``r18`` ... ``r2060``,
``mbf``/``mbf_large``, every ``vit_*`` and its WebFace42M variants) gets the same layer.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from otface_plugin.arcface_torch.schema import ConfigError
from otface_plugin.features import FeatureCapture, describe_candidates, unwrap

# backbone class (recipe's backbones/*.py) -> submodule; output at 112 x 112 input
FEATURE_LAYERS: Dict[str, str] = {
    "IResNet": "layer4",  # iresnet.py, iresnet2060.py (r18 ... r200, r2060): B x 512 x 7 x 7
    "MobileFaceNet": "conv_sep",  # mobilefacenet.py (mbf, mbf_large): B x 512 x 7 x 7, last conv stage
    # vit.py (vit_t ... vit_h): B x L x D patch tokens after the final LayerNorm; L = tokens kept by
    # the random masking while training (129 of 144 at mask_ratio 0.1); outside the checkpointed blocks
    "VisionTransformer": "norm",
}


class UnknownBackboneError(ConfigError):
    """The plugin does not know which layer of this backbone holds its high-level features."""


def default_layer(backbone: torch.nn.Module) -> str:
    """The layer the OT term reads for ``backbone`` (DDP unwrapped), by its class."""
    module = unwrap(backbone)
    name = type(module).__name__
    layer = FEATURE_LAYERS.get(name)
    if layer is None:
        raise UnknownBackboneError(
            f"otface-plugin does not know which layer of backbone {name} holds its high-level features "
            f"(known: {', '.join(f'{k} -> {v}' for k, v in FEATURE_LAYERS.items())}): {describe_candidates(module)}"
        )
    return layer


def capture_layer(backbone: torch.nn.Module, layer: Optional[str]) -> FeatureCapture:
    """The OT term's feature capture on ``layer`` (``otface.layer``; None: the backbone's default
    layer); a layer the backbone lacks is a :class:`ConfigError` naming the key, the backbone and
    its candidate layers."""
    try:
        return FeatureCapture(backbone, layer or default_layer(backbone))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_layer(cfg: Any) -> None:
    """``otface.layer`` checked when the config is loaded: the backbone ``cfg.network`` is built
    on the meta device (no memory, no weights) by the recipe's own ``backbones.get_model``, as
    train_v2.py builds it, and the capture is set on it. Skipped where the recipe's ``backbones``
    package cannot be imported (outside a checkout) or cannot build on the meta device: the same
    check then runs when train_v2.py builds the head (:func:`capture_layer`)."""
    layer = (cfg.get("otface") or {}).get("layer")
    if not layer or not cfg.get("network"):
        return
    try:
        from backbones import get_model  # the recipe's, found beside train_v2.py
    except ImportError:
        return
    try:
        with torch.device("meta"):
            backbone = get_model(cfg.network, dropout=0.0, fp16=bool(cfg.get("fp16", False)),
                                 num_features=cfg.get("embedding_size", 512))
    except Exception:  # noqa: BLE001 - a backbone the meta device cannot build: checked at build instead
        return
    capture = capture_layer(backbone, layer)
    capture.remove()
