"""Capture a backbone's intermediate features with a forward hook.

The OT term reads a high-level layer: a conv map (arcface_torch iresnet ``layer4``,
B x 512 x 7 x 7 at 112 x 112) or a set of tokens (a ViT's final ``norm``, B x L x D). A hook
reads it without changing the backbone, its state dict or its ONNX export.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["FeatureCapture", "feature_candidates", "unwrap"]

PROBE_INPUT = (2, 3, 112, 112)  # the recipe's face crops; 2 so batch-norm layers accept it


def unwrap(backbone: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP / DataParallel wrappers."""
    module = backbone
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


class FeatureCapture:
    """Keep the latest output of ``backbone.<layer>`` (DDP / DataParallel wrappers unwrapped).

    >>> capture = FeatureCapture(backbone, "layer4")
    >>> emb = backbone(images)
    >>> conv = capture.pop()   # (B, C, H, W) or (B, L, D), part of the autograd graph

    The layer must run outside gradient checkpointing (a reentrant checkpoint runs its blocks
    without autograd, so their outputs carry no gradient); :meth:`pop` says so if it does not.
    """

    def __init__(self, backbone: torch.nn.Module, layer: str = "layer4") -> None:
        module = unwrap(backbone)
        try:
            target = module.get_submodule(layer)
        except AttributeError:
            raise ValueError(
                f"backbone {type(module).__name__} has no submodule {layer!r} (option otface.layer); "
                f"{describe_candidates(module)}"
            ) from None
        self.layer = layer
        self._trainable = any(p.requires_grad for p in target.parameters())
        self._output: Optional[torch.Tensor] = None
        self._handle = target.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self._output = output

    def pop(self) -> torch.Tensor:
        """Return the captured features and forget them, so stale features are never reused."""
        if self._output is None:
            raise RuntimeError(f"no output of {self.layer!r} captured: run the backbone forward first")
        out, self._output = self._output, None
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the output of {self.layer!r} is a {type(out).__name__}, not a tensor; "
                            "choose another layer (option otface.layer)")
        if torch.is_grad_enabled() and self._trainable and out.is_floating_point() and not out.requires_grad:
            raise RuntimeError(
                f"the output of {self.layer!r} carries no gradient: the layer runs without autograd "
                "(e.g. inside a gradient-checkpointed block); choose a layer outside it (option otface.layer)"
            )
        return out

    def remove(self) -> None:
        self._handle.remove()
        self._output = None


def feature_candidates(module: torch.nn.Module, input_shape: Sequence[int] = PROBE_INPUT,
                       limit: int = 8) -> List[Tuple[str, Tuple[int, ...]]]:
    """The last ``limit`` submodules (in forward order) whose output is a (B, C, H, W) map or a
    (B, L, D) token set, with that output's shape, from one dummy forward in eval mode.

    Parameters, buffers and train/eval modes are left as they were. Empty when the dummy forward
    fails (a backbone for another input size).
    """
    seen: List[Tuple[str, Tuple[int, ...]]] = []
    names = {}

    def hook(mod, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() in (3, 4) and mod in names:
            name = names.pop(mod)  # first call only: a shared module is listed once
            seen.append((name, tuple(output.shape)))

    handles = []
    for name, sub in module.named_modules():
        if name:
            names[sub] = name
            handles.append(sub.register_forward_hook(hook))
    modes = {sub: sub.training for sub in module.modules()}
    param = next(module.parameters(), None)
    x = torch.zeros(*input_shape, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    try:
        module.eval()
        with torch.no_grad():
            module(x)
    except Exception:  # a probe only: the caller's error message is what matters
        pass
    finally:
        for handle in handles:
            handle.remove()
        for sub, mode in modes.items():
            sub.training = mode
    return seen[-limit:]


def describe_candidates(module: torch.nn.Module) -> str:
    """One sentence naming the layers a user could give as ``otface.layer``."""
    found = feature_candidates(module)
    if found:
        shapes = ", ".join(f"{name!r} {tuple(shape)}" for name, shape in found)
        return (f"set otface.layer to one of its layers with a (B, C, H, W) or (B, L, D) output (shapes for a "
                f"{'x'.join(map(str, PROBE_INPUT))} input): {shapes}; or set otface.feature: embedding")
    names = [n for n, _ in module.named_children()]
    return f"set otface.layer to one of its modules {names}, or set otface.feature: embedding"
