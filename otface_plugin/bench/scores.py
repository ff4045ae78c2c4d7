"""Pair scores of a trained backbone on the test ``.bin``, with the recipe's flip test; both
routes score their models with it (the recipe route in its training environment)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from otface_plugin.bench.data import normalise

__all__ = ["embed", "pair_scores"]


@torch.no_grad()
def embed(net: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised embeddings with the recipe's flip test: f(x) + f(flip(x))."""
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalise(images[i:i + batch])
        out.append(net(x) + net(x.flip(-1)))
    net.train()
    return F.normalize(torch.cat(out), dim=1)


def pair_scores(net: torch.nn.Module, images: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (``pairs``: (P, 2) indices into ``images``)."""
    e = embed(net, images)
    p = torch.from_numpy(pairs)
    return (e[p[:, 0]] * e[p[:, 1]]).sum(1).double().numpy()
