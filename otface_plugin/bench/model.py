"""A small iresnet-like backbone for the CPU study.

Same structure as arcface_torch's iresnet (conv stem, four residual stages ``layer1..layer4``
with IBasicBlock-style BN-conv-BN-PReLU-conv-BN blocks, BN-dropout-FC-BN embedding head), sized
down so that nine trainings plus an ablation fit an hour on two CPU cores. Like iresnet at
112 x 112 input, ``layer4`` is a 7 x 7 map, so the OT term sees 49 local descriptors per image.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class IBasicBlock(nn.Module):
    """iresnet's pre-activation residual block (BN, conv, BN, PReLU, conv, BN) + projection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.down is None else self.down(x))


class BenchNet(nn.Module):
    """Stem (stride 2) + layer1..layer4 (strides 2, 2, 2, 1): 112 -> 56 -> 28 -> 14 -> 7 -> 7.

    The stem stride and the stride-1 ``layer4`` are the savings against iresnet (stride-1 stem,
    stride-2 ``layer4``): the same 7 x 7 output for a quarter of the stem-resolution work.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), embedding_size: int = 128,
                 image_size: int = 112) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = nn.Sequential(nn.Conv2d(3, w1, 3, 2, 1, bias=False), nn.BatchNorm2d(w1), nn.PReLU(w1))
        self.layer1 = IBasicBlock(w1, w1, 2)
        self.layer2 = IBasicBlock(w1, w2, 2)
        self.layer3 = IBasicBlock(w2, w3, 2)
        self.layer4 = IBasicBlock(w3, w4, 1)
        side = image_size // 16
        self.bn2 = nn.BatchNorm2d(w4)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(w4 * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))
