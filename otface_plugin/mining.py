"""Hard-triplet mining on a batch of embeddings (the "triplet scheme" of OTFace).

For each anchor with a positive in the batch, the hardest positive is the least similar sample
of the same label and the hardest negative the most similar sample of another label (batch-hard
mining, Hermans et al. 2017, "In Defense of the Triplet Loss").

Label ``-1`` (``IGNORE_LABEL``) marks a sample without an identity, as the margin heads and
PartialFC read it: it is never an anchor, a positive or a negative. Non-finite embeddings are
an error (:class:`NonFiniteError`), not a silently wrong triplet choice.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["mine_triplets", "select_triplets", "most_violating", "hardest_pairs", "misclassified_mask",
           "check_triplets", "require_finite", "NonFiniteError",
           "FiniteWatch", "check_batch",
           "Triplets", "TRIPLET_MODES", "IGNORE_LABEL"]

TRIPLET_MODES = ("hard", "all", "misclassified")
IGNORE_LABEL = -1  # "no identity here", as in the margin heads and PartialFC


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or inf in the inputs of the OT term: the loss would be NaN without saying why."""


def require_finite(name: str, x: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name``, the count and the first samples when ``x``
    (first dim = batch) holds NaN or inf. One host synchronisation."""
    finite = torch.isfinite(x.detach())
    if bool(finite.all()):
        return
    bad_rows = torch.nonzero(~finite.reshape(finite.shape[0], -1).all(dim=1)).view(-1).tolist()
    raise NonFiniteError(_non_finite_message(name, int((~finite).sum()), x.numel(), bad_rows))


def _non_finite_message(name: str, count: int, numel: int, bad_rows) -> str:
    return (f"{name} hold {count} NaN/inf values of {numel} (batch samples "
            f"{list(bad_rows[:8])}{' ...' if len(bad_rows) > 8 else ''}): the loss would be NaN; "
            "check the learning rate, the input images and fp16 overflow")


class FiniteWatch:
    """:func:`require_finite` for a path that must not synchronise with its device (the OT term's
    fixed-shape path).

    A Python error needs the host to read the data. Where that read waits for nothing (a CPU
    tensor) the check is :func:`require_finite` itself: the same error in the same step. On a CUDA
    tensor the step only queues a small summary (count, first bad samples) and its copy to pinned
    host memory; the error, with the same message, is raised at the first host read after it has
    arrived: the next :meth:`check` whose event has completed (a non-blocking query, usually the
    next step) or :meth:`raise_pending` (``OTFaceLoss.components()`` calls it, and it synchronises
    anyway). Not ``torch._assert_async``: on CUDA it is a device-side assert, which names nothing
    and leaves the CUDA context unusable (no checkpoint can be saved after it).
    A ``meta`` tensor holds no values: nothing to check.
    """

    MAX_PENDING = 8  # past this many summaries in flight, wait for the oldest (bounds the host memory)

    def __init__(self) -> None:
        self._pending: list = []

    def check(self, name: str, x: torch.Tensor) -> None:
        self.raise_pending(wait=len(self._pending) >= self.MAX_PENDING)
        if x.device.type == "meta":
            return
        if x.device.type != "cuda":
            require_finite(name, x)
            return
        summary = _non_finite_summary(x)
        host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
        host.copy_(summary, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((name, x.numel(), host, event))

    def raise_pending(self, wait: bool = True) -> None:
        """Raise the error of a checked step whose summary has arrived (all of them: ``wait``)."""
        while self._pending:
            name, numel, host, event = self._pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self._pending.pop(0)
            message = _summary_message(name, numel, host.tolist())
            if message:
                self._pending.clear()
                raise NonFiniteError(message)


@torch.no_grad()
def _non_finite_summary(x: torch.Tensor) -> torch.Tensor:
    """(11,) int64 on x's device, no host sync: the NaN/inf count, the bad samples' count and the
    first 9 bad samples (9: enough to tell "more than 8"; padded with the batch size)."""
    bad = ~torch.isfinite(x.detach())
    rows = bad.reshape(bad.shape[0], -1).any(dim=1)
    order = torch.arange(rows.shape[0], device=x.device)
    first = torch.sort(torch.where(rows, order, torch.full_like(order, rows.shape[0]))).values[:9]
    first = torch.cat([first, first.new_full((9 - first.shape[0],), rows.shape[0])])
    return torch.cat([bad.sum().view(1), rows.sum().view(1), first])


def _summary_message(name: str, numel: int, summary) -> str:
    """:func:`require_finite`'s message from a :func:`_non_finite_summary` read on the host; ""
    when all values were finite."""
    count, rows, first = int(summary[0]), int(summary[1]), [int(v) for v in summary[2:]]
    return _non_finite_message(name, count, numel, first[:min(rows, 9)]) if count else ""

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_batch(embeddings, labels, embedding_size: Optional[int] = None) -> torch.Tensor:
    """The flat (B,) labels of a batch, after a ValueError naming the argument and its bad type,
    shape or dtype: embeddings not (B, D) (D = ``embedding_size`` when given), labels not an
    integer tensor of shape (B,) or (B, 1). Reads only shapes and dtypes: no host sync."""
    want = "D" if embedding_size is None else str(embedding_size)
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"embeddings must be a (B, {want}) tensor, got a {type(embeddings).__name__}")
    if embeddings.dim() != 2 or (embedding_size is not None and embeddings.shape[1] != embedding_size):
        size = "" if embedding_size is None else f" (embedding_size={embedding_size})"
        raise ValueError(f"embeddings must be (B, {want}){size}, got shape {tuple(embeddings.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor of class indices, got a {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if not (labels.dim() == 1 or (labels.dim() == 2 and labels.shape[1] == 1)):
        raise ValueError(f"labels must be (B,) or (B, 1), got shape {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must hold one class per embedding ({embeddings.shape[0]}), got {labels.shape[0]}")
    return labels.reshape(-1)


def check_triplets(indices_tuple, batch_size: int, device: Optional[torch.device] = None) -> Triplets:
    """A user's ``(anchors, positives, negatives)`` (pytorch-metric-learning's ``indices_tuple``
    of a triplet miner) as three (T,) int64 tensors on ``device``; a ValueError saying what is
    wrong for anything else: not three tensors, not 1-D integer tensors of one length, or an
    index outside ``[0, batch_size)``. One host synchronisation (the range check)."""
    if not (isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) == 3
            and all(isinstance(t, torch.Tensor) for t in indices_tuple)):
        got = type(indices_tuple).__name__
        if isinstance(indices_tuple, (tuple, list)):
            got += f" of {len(indices_tuple)} ({', '.join(type(t).__name__ for t in indices_tuple)})"
        raise ValueError(f"indices_tuple must be three index tensors (anchors, positives, negatives), got a {got}")
    shapes = [tuple(t.shape) for t in indices_tuple]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"indices_tuple must be three 1-D index tensors of one length, got shapes {shapes}")
    if any(t.dtype == torch.bool or t.is_floating_point() or t.is_complex() for t in indices_tuple):
        raise ValueError(f"indices_tuple must hold integer indices, got dtypes {[t.dtype for t in indices_tuple]}")
    a, p, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    if a.numel():
        low, high = (int(v) for v in torch.aminmax(torch.cat([a, p, n])))
        if low < 0 or high >= batch_size:
            raise ValueError(f"indices_tuple holds index {low if low < 0 else high}, outside the batch of {batch_size}")
    return a, p, n


@torch.no_grad()
def hardest_pairs(similarity: torch.Tensor, labels: torch.Tensor):
    """Hardest positive / negative per anchor on a (B, B) similarity matrix.

    Returns ``(positive, negative, valid)``: (B,) indices and a (B,) mask of anchors that have
    both a positive (same label, other sample) and a negative in the batch. Samples labelled
    ``IGNORE_LABEL`` take no part: never valid anchors, never chosen as positive or negative.
    """
    B = similarity.shape[0]
    labels = labels.view(-1)
    if B == 0:  # argmin over an empty dim raises; an empty batch simply has no triplets
        empty = torch.zeros(0, dtype=torch.long, device=similarity.device)
        return empty, empty, torch.zeros(0, dtype=torch.bool, device=similarity.device)
    known = labels != IGNORE_LABEL
    both = known[:, None] & known[None, :]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(B, dtype=torch.bool, device=similarity.device)
    pos_mask = same & ~eye & both
    neg_mask = ~same & both
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
        labels: (B,) identity labels; ``-1`` samples are ignored.
        mode: ``"hard"``: triplets with ``S[a, n] + margin > S[a, p]``; ``"all"``: every anchor
            with a positive; ``"misclassified"``: anchors whose target logit is not the largest
            (needs ``logits`` (B, num_classes) indexed by ``labels``, or a ``misclassified``
            (B,) boolean mask).
        margin: the triplet margin ``m_t`` of ``"hard"`` mode.

    Returns:
        Three (T,) int64 index tensors; empty when the batch has no qualifying anchor (for
        example when no label occurs twice, or the batch is empty).

    Raises:
        NonFiniteError: the embeddings hold NaN or inf.
    """
    if mode not in TRIPLET_MODES:  # before the finite check's host sync
        raise ValueError(f"triplet mode must be one of {TRIPLET_MODES}, got {mode!r}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    labels = labels.view(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    require_finite("embeddings", embeddings)

    x = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    positive, negative, select = select_triplets(x @ x.t(), labels, mode, margin, logits, misclassified)
    idx = torch.nonzero(select, as_tuple=False).view(-1)
    return idx, positive[idx], negative[idx]


@torch.no_grad()
def select_triplets(
    similarity: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "hard",
    margin: float = 0.1,
    logits: Optional[torch.Tensor] = None,
    misclassified: Optional[torch.Tensor] = None,
) -> Triplets:
    """The hardness rule: every anchor's hardest positive and negative on a (B, B) similarity
    matrix and the (B,) mask of the anchors ``mode`` selects (see :func:`mine_triplets`). Fixed
    shapes, no host sync: the OT term's fixed-shape path masks with it, :func:`mine_triplets`
    keeps the selected anchors."""
    if mode not in TRIPLET_MODES:
        raise ValueError(f"triplet mode must be one of {TRIPLET_MODES}, got {mode!r}")
    positive, negative, select = hardest_pairs(similarity, labels)
    anchors = torch.arange(similarity.shape[0], device=similarity.device)
    S = similarity.float()
    if mode == "hard":
        select = select & (S[anchors, negative] + margin > S[anchors, positive])
    elif mode == "misclassified":
        select = select & misclassified_mask(labels, logits, misclassified)
    return positive, negative, select


@torch.no_grad()
def most_violating(x: torch.Tensor, triplets: Triplets, k: int,
                   select: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions of the ``k`` triplets with the largest ``S(a, n) - S(a, p)`` (cosines of the
    L2-normalised embeddings ``x``, as the miners have them), those ``select`` masks in ranked
    before all others: the ``max_triplets`` cap, a memory bound for huge batches. Needs
    ``k <= len(triplets)``; no host sync."""
    a, p, n = triplets
    violation = (x[a] * x[n]).sum(1) - (x[a] * x[p]).sum(1)
    if select is not None:
        violation = torch.where(select, violation, torch.full_like(violation, -math.inf))
    return violation.topk(k).indices


def misclassified_mask(
    labels: torch.Tensor, logits: Optional[torch.Tensor], misclassified: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B,) bool: the samples whose target logit is not the largest (a given ``misclassified``
    mask is checked and used as is); the ``"misclassified"`` triplet mode's anchor filter."""
    if misclassified is not None:
        mask = misclassified.view(-1).to(device=labels.device, dtype=torch.bool)
        if mask.shape[0] != labels.shape[0]:
            raise ValueError(f"misclassified mask has {mask.shape[0]} entries for {labels.shape[0]} samples")
        return mask
    if logits is None:
        raise ValueError("triplet mode 'misclassified' needs logits (B, num_classes) or a misclassified mask")
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (B, num_classes) with B={labels.shape[0]}, got {tuple(logits.shape)}")
    # -1 samples are never anchors (hardest_pairs); any column keeps their gather in range
    index = labels.long().clamp(min=0).view(-1, 1)
    target = logits.gather(1, index).squeeze(1)
    # Ties count as correct: only a strictly larger other logit misclassifies.
    others = logits.detach().clone()
    others.scatter_(1, index, float("-inf"))
    return others.amax(dim=1) > target
