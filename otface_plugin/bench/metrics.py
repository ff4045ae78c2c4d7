"""Verification metrics on pair similarity scores (higher = more similar).

Own implementations (not the recipe's code) of what its ``.bin`` evaluation reports, plus
TAR at fixed FAR and accuracy on a subset of hard pairs.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> Tuple[float, float]:
    """Threshold ``t`` maximising the accuracy of ``score > t`` and that accuracy.

    Exact: every midpoint between consecutive distinct scores (and below / above all) is tried,
    in O(n log n). Ties between thresholds go to the lowest one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = len(scores)
    if n == 0:
        raise ValueError("no pairs")
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    # Threshold just below s[i] (i = 0..n): pairs 0..i-1 rejected, i..n-1 accepted.
    neg_below = np.concatenate([[0], np.cumsum(~y)])           # correct rejections
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])  # correct acceptances
    correct = neg_below + pos_above
    # Only cut between distinct scores: a cut inside a run of ties is not a threshold.
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] != s[:-1]
    correct = np.where(valid, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        t = s[0] - 1.0
    elif i == n:
        t = s[-1]
    else:
        t = (s[i - 1] + s[i]) / 2
    return float(t), float(correct[i] / n)


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10
                   ) -> Dict[str, object]:
    """k-fold verification accuracy as the recipe's ``.bin`` evaluation does it: consecutive
    folds over the pair order (no shuffle), the best threshold on k-1 folds applied to the
    held-out fold. Returns mean/std over folds, the thresholds, and per-pair correctness of the
    held-out predictions (each pair is predicted exactly once)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = len(scores)
    if folds < 2 or n < folds:
        raise ValueError(f"need 2 <= folds <= pairs, got folds={folds}, pairs={n}")
    bounds = np.array_split(np.arange(n), folds)  # what sklearn's KFold(shuffle=False) gives
    accs, thresholds = [], []
    correct = np.zeros(n, dtype=bool)
    for test in bounds:
        train = np.setdiff1d(np.arange(n), test, assume_unique=True)
        t, _ = best_threshold(scores[train], issame[train])
        pred = scores[test] > t
        correct[test] = pred == issame[test]
        accs.append(float(correct[test].mean()))
        thresholds.append(t)
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "fold_accuracy": accs,
            "thresholds": thresholds, "correct": correct}


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> Tuple[float, float]:
    """(TAR, threshold) at false-accept rate ``far`` over all pairs.

    The threshold is the lowest ``t`` with at most ``floor(far * negatives)`` negative scores
    above it (accept = ``score > t``). With too few negatives for ``far`` (floor = 0) this is the
    strictest operating point: no false accept at all.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    neg = np.sort(scores[~issame])[::-1]
    pos = scores[issame]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs positive and negative pairs")
    allowed = int(np.floor(far * len(neg) + 1e-9))
    t = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(pos > t)), float(t)


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) at every distinct threshold, FAR ascending, starting at (0, 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last = np.r_[s[1:] != s[:-1], True]  # keep the end of each run of ties
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


def hard_pairs(reference_scores: np.ndarray, issame: np.ndarray, fraction: float = 0.1
               ) -> np.ndarray:
    """Mask of the ``fraction`` lowest-scoring positive and highest-scoring negative pairs
    under a reference model (at least one of each)."""
    ref = np.asarray(reference_scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    mask = np.zeros(len(ref), dtype=bool)
    pos, neg = np.flatnonzero(issame), np.flatnonzero(~issame)
    k_pos = max(1, int(round(fraction * len(pos))))
    k_neg = max(1, int(round(fraction * len(neg))))
    mask[pos[np.argsort(ref[pos], kind="stable")[:k_pos]]] = True
    mask[neg[np.argsort(-ref[neg], kind="stable")[:k_neg]]] = True
    return mask


def evaluate(scores: np.ndarray, issame: np.ndarray, folds: int = 10,
             fars: Sequence[float] = (1e-2, 1e-3)) -> Dict[str, object]:
    """Accuracy (k-fold), TAR at each FAR, and the per-pair held-out correctness."""
    kf = kfold_accuracy(scores, issame, folds)
    out = {"accuracy": kf["accuracy"], "accuracy_fold_std": kf["std"], "folds": folds,
           "correct": kf["correct"]}
    for far in fars:
        out[f"tar@far={far:g}"] = tar_at_far(scores, issame, far)[0]
    return out


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
