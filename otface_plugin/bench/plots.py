"""PNG plots of a study (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from otface_plugin.bench.report import is_main

COLORS = {"arcface": "tab:blue", "cosface": "tab:green", "otface": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless, and deterministic output
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(rows: List[Dict[str, Any]], key: str, only_with_triplets: bool = False):
    """Mean and std over runs of a logged value; optionally NaN where a batch had no hard
    triplet (W(a,p), W(a,n) are undefined there, not 0)."""
    import warnings

    steps = np.asarray(rows[0]["history"]["step"])
    vals = np.asarray([r["history"][key] for r in rows], dtype=float)
    if only_with_triplets:
        trip = np.asarray([r["history"]["triplets"] for r in rows], dtype=float)
        vals = np.where(trip > 0, vals, np.nan)
    with warnings.catch_warnings():  # all-NaN columns: no run had triplets at that step
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(vals, 0), np.nanstd(vals, 0)


def plot_training(results: Dict[str, Any], path: Path) -> None:
    """Total loss per loss (mean over seeds, band = std) and OTFace's OT components."""
    plt = _plt()
    runs = [r for r in results["runs"].values() if is_main(r)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    for loss in results["meta"]["losses"]:
        rows = [r for r in runs if r["loss"] == loss]
        if rows:
            s, m, sd = _mean_curve(rows, "loss")
            ax.plot(s, m, color=COLORS.get(loss), label=f"{loss} (n={len(rows)})")
            ax.fill_between(s, m - sd, m + sd, color=COLORS.get(loss), alpha=0.2)
    ax.set(title="training loss (mean ± std over seeds)", xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    ot = [r for r in runs if r["loss"] == "otface"]
    if ot:
        s, margin, _ = _mean_curve(ot, "margin")
        _, term, _ = _mean_curve(ot, "ot")
        _, lam, _ = _mean_curve(ot, "lambda")
        ax = axes[0, 1]
        ax.plot(s, margin, color="tab:purple", label="margin part")
        ax.plot(s, lam * term, color="tab:red", label="lambda x L_OT")
        ax.set(title="OTFace: loss components", xlabel="step", yscale="log")
        ax.legend()
        ax = axes[1, 0]
        for key, c, lab in (("w_ap", "tab:orange", "W(anchor, positive)"), ("w_an", "tab:gray", "W(anchor, negative)")):
            _, m, sd = _mean_curve(ot, key, only_with_triplets=True)
            ax.plot(s, m, color=c, marker=".", ms=3, label=lab)
            ax.fill_between(s, m - sd, m + sd, color=c, alpha=0.2)
        ax.plot(s, term, color="tab:red", label="L_OT (hinge)")
        ax.set(title="OTFace: OT costs on hard triplets (gaps: none in the batch)", xlabel="step")
        ax.legend()
        ax = axes[1, 1]
        _, m, sd = _mean_curve(ot, "triplets")
        ax.plot(s, m, color="tab:red")
        ax.fill_between(s, m - sd, m + sd, color="tab:red", alpha=0.2)
        ax.set(title="OTFace: hard triplets per batch", xlabel="step", ylabel="count")
    else:
        for a in (axes[0, 1], axes[1, 0], axes[1, 1]):
            a.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(results: Dict[str, Any], scores: Dict[str, np.ndarray], issame: np.ndarray, path: Path) -> None:
    """ROC (TAR vs FAR, log FAR) of every default run; thin lines are seeds."""
    from otface_plugin.bench.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    seen = set()
    for name, r in results["runs"].items():
        if not is_main(r) or name not in scores:
            continue
        far, tar = roc_curve(scores[name], issame)
        label = None if r["loss"] in seen else r["loss"]
        seen.add(r["loss"])
        ax.plot(np.maximum(far, 1e-4), tar, color=COLORS.get(r["loss"]), lw=1.2, alpha=0.7, label=label)
    for far in results["meta"]["fars"]:
        ax.axvline(far, color="k", lw=0.6, ls=":")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="FAR (false accept rate)",
           ylabel="TAR (true accept rate)", title="held-out pairs: ROC per loss (one line per seed)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity_hist(results: Dict[str, Any], scores: Dict[str, np.ndarray], issame: np.ndarray,
                         path: Path) -> None:
    """Positive / negative pair similarity histograms per loss (first seed)."""
    plt = _plt()
    losses = results["meta"]["losses"]
    seed = results["meta"]["seeds"][0]
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.6), sharey=True, squeeze=False)
    bins = np.linspace(-1, 1, 61)
    for ax, loss in zip(axes[0], losses):
        name = f"{loss}-default-s{seed}"
        if name not in scores:
            continue
        s = scores[name]
        ax.hist(s[issame], bins=bins, alpha=0.6, color="tab:green", label="same identity", density=True)
        ax.hist(s[~issame], bins=bins, alpha=0.6, color="tab:gray", label="different", density=True)
        ax.set(title=f"{loss} (seed {seed})", xlabel="cosine similarity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(results: Dict[str, Any], path: Path) -> None:
    """Accuracy of each ablation variant, with the seed spread of the default as a band."""
    plt = _plt()
    abl = results.get("ablation") or {}
    if not abl:
        return
    names = list(abl)
    acc = [results["runs"][abl[n]["run"]]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(len(names)), acc, color=["tab:red" if n == "default" else "tab:orange" for n in names])
    summ = results["summary"].get("otface", {}).get("accuracy")
    if summ and summ["n"] > 1:
        ax.axhspan(summ["mean"] - summ["std"], summ["mean"] + summ["std"], color="tab:red", alpha=0.15,
                   label=f"OTFace default, mean ± std over {summ['n']} seeds")
        ax.legend(loc="lower right")
    arc = results["summary"].get("arcface", {}).get("accuracy")
    if arc:
        ax.axhline(arc["mean"], color="tab:blue", ls="--", lw=1, label="ArcFace mean")
        ax.legend(loc="lower right")
    lo = min(acc + ([arc["mean"]] if arc else [])) - 0.05
    ax.set(ylim=(max(0, lo), 1), ylabel="accuracy (k-fold)", title="OTFace ablation (one seed)")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
