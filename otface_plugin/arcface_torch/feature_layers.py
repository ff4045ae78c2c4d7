"""Which layer of each arcface_torch backbone the OT term reads (option ``otface.layer`` overrides).

Chosen by the backbone's class, so every ``network`` name that builds it (``r18`` ... ``r2060``,
``mbf``/``mbf_large``, every ``vit_*`` and its WebFace42M variants) gets the same layer.
"""
from __future__ import annotations

from typing import Dict

import torch

from otface_plugin.features import describe_candidates, unwrap

# backbone class (recipe's backbones/*.py) -> submodule; output at 112 x 112 input
FEATURE_LAYERS: Dict[str, str] = {
    "IResNet": "layer4",  # iresnet.py, iresnet2060.py (r18 ... r200, r2060): B x 512 x 7 x 7
    "MobileFaceNet": "conv_sep",  # mobilefacenet.py (mbf, mbf_large): B x 512 x 7 x 7, last conv stage
    # vit.py (vit_t ... vit_h): B x L x D patch tokens after the final LayerNorm; L = tokens kept by
    # the random masking while training (129 of 144 at mask_ratio 0.1); outside the checkpointed blocks
    "VisionTransformer": "norm",
}


class UnknownBackboneError(ValueError):
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
