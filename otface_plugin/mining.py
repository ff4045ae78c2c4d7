"""Hard-triplet mining on a batch of embeddings (the "triplet scheme" of OTFace).

For each anchor with a positive in the batch, the hardest positive is the least similar sample
of the same label and the hardest negative the most similar sample of another label (batch-hard
mining, Hermans et al. 2017, "In Defense of the Triplet Loss").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["mine_triplets", "hardest_pairs", "TRIPLET_MODES"]

TRIPLET_MODES = ("hard", "all", "misclassified")

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.no_grad()
def hardest_pairs(similarity: torch.Tensor, labels: torch.Tensor):
    """Hardest positive / negative per anchor on a (B, B) similarity matrix.

    Returns ``(positive, negative, valid)``: (B,) indices and a (B,) mask of anchors that have
    both a positive (same label, other sample) and a negative in the batch.
    """
    B = similarity.shape[0]
    labels = labels.view(-1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(B, dtype=torch.bool, device=similarity.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    S = similarity.float()
    positive = torch.where(pos_mask, S, torch.full_like(S, float("inf"))).argmin(dim=1)
    negative = torch.where(neg_mask, S, torch.full_like(S, float("-inf"))).argmax(dim=1)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    return positive, negative, valid


@torch.no_grad()
def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "hard",
    margin: float = 0.1,
    logits: Optional[torch.Tensor] = None,
    misclassified: Optional[torch.Tensor] = None,
) -> Triplets:
    """Select (anchor, positive, negative) index triplets from a batch.

    Args:
        embeddings: (B, D) embeddings; cosine similarity is taken on their L2-normalised form.
        labels: (B,) identity labels.
        mode: ``"hard"``: triplets with ``S[a, n] + margin > S[a, p]``; ``"all"``: every anchor
            with a positive; ``"misclassified"``: anchors whose target logit is not the largest
            (needs ``logits`` (B, num_classes) indexed by ``labels``, or a ``misclassified``
            (B,) boolean mask).
        margin: the triplet margin ``m_t`` of ``"hard"`` mode.

    Returns:
        Three (T,) int64 index tensors; empty when the batch has no qualifying anchor (for
        example when no label occurs twice).
    """
    if mode not in TRIPLET_MODES:
        raise ValueError(f"triplet mode must be one of {TRIPLET_MODES}, got {mode!r}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    labels = labels.view(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")

    x = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    S = x @ x.t()
    positive, negative, select = hardest_pairs(S, labels)
    anchors = torch.arange(S.shape[0], device=S.device)

    if mode == "hard":
        select = select & (S[anchors, negative] + margin > S[anchors, positive])
    elif mode == "misclassified":
        select = select & _misclassified_mask(labels, logits, misclassified)

    idx = torch.nonzero(select, as_tuple=False).view(-1)
    return idx, positive[idx], negative[idx]


def _misclassified_mask(labels, logits, misclassified):
    if misclassified is not None:
        mask = misclassified.view(-1).to(device=labels.device, dtype=torch.bool)
        if mask.shape[0] != labels.shape[0]:
            raise ValueError(f"misclassified mask has {mask.shape[0]} entries for {labels.shape[0]} samples")
        return mask
    if logits is None:
        raise ValueError("triplet mode 'misclassified' needs logits (B, num_classes) or a misclassified mask")
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (B, num_classes) with B={labels.shape[0]}, got {tuple(logits.shape)}")
    target = logits.gather(1, labels.long().view(-1, 1)).squeeze(1)
    # Ties count as correct: only a strictly larger other logit misclassifies.
    others = logits.detach().clone()
    others.scatter_(1, labels.long().view(-1, 1), float("-inf"))
    return others.amax(dim=1) > target
