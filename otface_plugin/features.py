"""Capture a backbone's intermediate feature map with a forward hook.

The OT term needs the last conv stage (arcface_torch iresnet: ``layer4``, B x 512 x 7 x 7 at
112 x 112). A hook reads it without changing the backbone, its state dict or its ONNX export.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FeatureCapture"]


class FeatureCapture:
    """Keep the latest output of ``backbone.<layer>`` (DDP / DataParallel wrappers unwrapped).

    >>> capture = FeatureCapture(backbone, "layer4")
    >>> emb = backbone(images)
    >>> conv = capture.pop()   # (B, C, H, W), part of the autograd graph
    """

    def __init__(self, backbone: torch.nn.Module, layer: str = "layer4") -> None:
        module = backbone
        while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        try:
            target = module.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in module.named_children()]
            raise ValueError(
                f"backbone {type(module).__name__} has no submodule {layer!r}; its top-level modules are {names}"
            ) from None
        self.layer = layer
        self._output: Optional[torch.Tensor] = None
        self._handle = target.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self._output = output

    def pop(self) -> torch.Tensor:
        """Return the captured map and forget it, so a stale map is never reused."""
        if self._output is None:
            raise RuntimeError(f"no output of {self.layer!r} captured: run the backbone forward first")
        out, self._output = self._output, None
        return out

    def remove(self) -> None:
        self._handle.remove()
        self._output = None
