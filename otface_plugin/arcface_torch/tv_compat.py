"""The few torchvision transforms arcface_torch's MXFaceDataset uses, for when torchvision is
missing or built for another torch (a torchvision wheel imports only beside its own torch).

Same arithmetic and the same random draw as torchvision's (``torch.rand(1) < p`` for the flip),
so a run gives the same batches with either.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import torch

_MISSING = (
    "torchvision could not be imported (missing, or built for another torch release); "
    "otface-plugin supplies only the transforms of the .rec pipeline. {what} needs a torchvision "
    "that matches your torch (pip install 'torchvision==<the release paired with torch "
    f"{torch.__version__.split('+')[0]}>'), or convert the folder with: otface-data build-rec"
)


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms: List[Callable] = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class ToPILImage:
    """Accepts the decoded H x W x C uint8 array; keeps it as an array (no PIL round trip needed)."""

    def __call__(self, pic):
        pic = np.asarray(pic)
        if pic.ndim != 3 or pic.dtype != np.uint8:
            raise TypeError(f"expected an H x W x C uint8 image, got {pic.dtype} {pic.shape}")
        return pic


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img):
        if torch.rand(1) < self.p:  # the same draw as torchvision, so the RNG stream matches
            return img[:, ::-1] if isinstance(img, np.ndarray) else img.flip(-1)
        return img


class ToTensor:
    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        arr = torch.from_numpy(np.array(pic, copy=True))
        return arr.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        self.mean, self.std, self.inplace = list(mean), list(std), inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


class _Transforms:
    """Stands in for the ``torchvision.transforms`` module."""
    Compose = Compose
    ToPILImage = ToPILImage
    RandomHorizontalFlip = RandomHorizontalFlip
    ToTensor = ToTensor
    Normalize = Normalize


transforms = _Transforms()


class ImageFolder:
    def __init__(self, *args, **kwargs) -> None:
        raise ImportError(_MISSING.format(what="Training from an image folder (config.rec is not a .rec directory)"))
