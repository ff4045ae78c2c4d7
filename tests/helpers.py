"""Small builders several test files share (``from helpers import ...``); the fixtures are in
conftest.py. Kept apart from conftest.py because these need torch, numpy and Pillow, and the
mxnet-compat environment loads conftest.py without torch."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

from otface_plugin.data.imagecodec import encode_image


class TinyBackbone(torch.nn.Module):
    """iresnet-like, for 3 x 16 x 16 images: two stride-2 conv stages (the second is ``layer4``,
    where OTFace reads its conv features), then a linear embedding of size ``dim``."""

    def __init__(self, dim: int = 32, widths: Sequence[int] = (16, 24)):
        super().__init__()
        self.layer1 = torch.nn.Conv2d(3, widths[0], 3, stride=2, padding=1)
        self.layer4 = torch.nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(widths[1] * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(torch.relu(self.layer1(x)))
        return self.fc(torch.relu(x).flatten(1))


def make_faces(root: Path, n_id: int = 4, n_img: Union[int, Sequence[int]] = 3, size: int = 8, *,
               names: Optional[Sequence[str]] = None,
               value: Callable[[int, int], int] = lambda c, j: 20 * c + j) -> Path:
    """Identity folders ``root/<name>/<j>.png``: grayscale ``size`` x ``size`` PNGs, every pixel
    of identity ``c``'s image ``j`` equal to ``value(c, j) % 256``.

    ``names`` default to ``id0``, ``id1``, ... (``n_id`` of them); ``n_img`` is the number of
    images of every identity, or one number per identity."""
    names = list(names) if names is not None else [f"id{c}" for c in range(n_id)]
    counts = [n_img] * len(names) if isinstance(n_img, int) else list(n_img)
    for c, (name, n) in enumerate(zip(names, counts)):
        d = root / name
        d.mkdir(parents=True)
        for j in range(n):
            img = np.full((size, size), value(c, j) % 256, np.uint8)
            (d / f"{j}.png").write_bytes(encode_image(img, ".png"))
    return root


def snapshot(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (hidden ones included): {relative path: bytes}."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def random_cosines(B: int = 16, C: int = 10, seed: int = 0):
    """(B, C) cosines in [-0.9, 0.9] and labels, one of them -1 (a class on another rank)."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(B, C, generator=g) * 1.8 - 0.9
    labels = torch.randint(0, C, (B,), generator=g)
    labels[3] = -1  # a sample whose class lives on another rank
    return cos, labels


def recipe_losses_module():
    """The pinned recipe's losses.py, imported from the checkout (skips without one)."""
    import importlib.util

    import pytest
    from conftest import NO_UPSTREAM, UPSTREAM

    if UPSTREAM is None:
        pytest.skip(NO_UPSTREAM)
    spec = importlib.util.spec_from_file_location("recipe_losses", UPSTREAM / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
