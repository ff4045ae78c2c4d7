"""One training run in the plugin's own minimal loop, and its evaluation.

This loop stands in for the recipe's ``train_v2.py`` (documented as such in the report): same
loss call (``loss_fn(embeddings, labels)``, plus the ``layer4`` map for OTFace), SGD with
momentum and weight decay, a linear warm-up then the recipe's polynomial (power 2) decay, and the
recipe's flip-augmented ``.bin`` embedding. No DDP, no PartialFC sampling (all classes fit).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from otface_plugin import build_loss
from otface_plugin.bench.data import TrainSet, normalise, pk_batches
from otface_plugin.bench.model import BenchNet
from otface_plugin.features import FeatureCapture
from otface_plugin.losses.components import PARTS
from otface_plugin.losses.head import HEADS

LOSSES = ("arcface", "cosface", "otface")  # the default study
# every loss a study may name: the default ones and the registered margin heads (adaface, ...)
LOSS_CHOICES = LOSSES + tuple(sorted(HEADS))


@dataclass
class TrainConfig:
    """Everything that makes runs comparable; the same for every loss of a study."""

    steps: int = 600
    P: int = 8
    K: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    scale: float = 32.0
    embedding_size: int = 128
    widths: Tuple[int, ...] = (16, 32, 64, 128)
    log_every: int = 10
    sampler: str = "pk"  # "hard": HardPKSampler on the margin head's class centres
    threads: int = 0  # 0: torch's default (in-process runs); parallel jobs use cpus // jobs

    @property
    def batch_size(self) -> int:
        return self.P * self.K


# OTFace options of the study (README defaults, except warm-up in steps of this budget).
OTFACE_DEFAULTS: Dict[str, Any] = {"lambda_ot": 0.1, "eps": 0.05, "feature": "conv",
                                   "triplet_mode": "hard"}


@dataclass
class RunSpec:
    """One (loss, seed, ablation variant) run."""

    loss: str
    seed: int
    variant: str = "default"
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.variant}-s{self.seed}"


def build_run_loss(spec: RunSpec, cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The loss module of a run; OTFace's lambda warms up over the first 10% of the steps."""
    common = dict(num_classes=num_classes, embedding_size=cfg.embedding_size, s=cfg.scale)
    if spec.loss == "otface":
        opts = {**OTFACE_DEFAULTS, "warmup_steps": max(1, cfg.steps // 10), **spec.options}
        return build_loss("otface", margin="arcface", **common, **opts)
    if spec.options:
        raise ValueError(f"{spec.loss} takes no ablation options, got {spec.options}")
    return build_loss(spec.loss, **common)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then polynomial decay with power 2 (the recipe's PolyScheduler)."""
    warm = max(1, int(cfg.warmup_fraction * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (1 - (step - warm) / max(1, cfg.steps - warm)) ** 2


def train_run(spec: RunSpec, cfg: TrainConfig, train: TrainSet,
              on_step: Optional[Callable[[int], None]] = None
              ) -> Tuple[BenchNet, Dict[str, List[float]], Dict[str, float]]:
    """Train one backbone; returns it, the logged history and timings.

    Seeding: the backbone and the margin head are created right after ``manual_seed(seed)``,
    so all losses start from identical weights; the batches come from :func:`pk_batches` with
    the same seed, so all losses see the same images in the same order.
    """
    torch.manual_seed(spec.seed)
    net = BenchNet(cfg.widths, cfg.embedding_size, train.images.shape[-1])
    loss_fn = build_run_loss(spec, cfg, train.num_classes)
    capture = FeatureCapture(net, "layer4")
    params = [*net.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    is_ot = spec.loss == "otface"
    history: Dict[str, List[float]] = {"step": [], "loss": []}
    if is_ot:
        for k in PARTS:
            history[k] = []
    net.train()
    loss_fn.train()
    step_times: List[float] = []
    start = time.perf_counter()
    head = loss_fn.margin_loss if is_ot else loss_fn
    batches = pk_batches(train, cfg.batch_size, cfg.K, spec.seed, cfg.steps, cfg.sampler,
                         centres=lambda: head.weight.detach())
    for step, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        emb = net(x)
        feats = capture.pop()
        loss = loss_fn(emb, y, features=feats) if is_ot else loss_fn(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{spec.name}: loss became {value} at step {step}")
            history["step"].append(step)
            history["loss"].append(value)
            if is_ot:
                c = loss_fn.components()
                for k in PARTS:
                    history[k].append(float(c[k]))
        if on_step:
            on_step(step)
    total = time.perf_counter() - start
    capture.remove()
    times = np.asarray(step_times)
    timing = {"train_seconds": total, "ms_per_step_mean": 1000 * float(times.mean()),
              "ms_per_step_median": 1000 * float(np.median(times))}
    return net, history, timing


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so an interrupted run never leaves a half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_run(run_dir: Path, key: str, spec: RunSpec, net: torch.nn.Module, history: dict,
             timing: dict, scores: np.ndarray) -> dict:
    """Store a finished run; ``result.json`` is written last and marks it finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run_dir / "model.pt.tmp")
    os.replace(run_dir / "model.pt.tmp", run_dir / "model.pt")
    with open(run_dir / "scores.npy.tmp", "wb") as f:
        np.save(f, scores)
    os.replace(run_dir / "scores.npy.tmp", run_dir / "scores.npy")
    result = {"key": key, "spec": asdict(spec), "history": history, "timing": timing}
    atomic_write_text(run_dir / "result.json", json.dumps(result))
    return result


def load_run(run_dir: Path, key: str) -> Optional[Tuple[dict, np.ndarray]]:
    """A finished run with the same configuration key, or None."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
        if result.get("key") != key:
            return None
        return result, np.load(run_dir / "scores.npy")
    except (OSError, ValueError):
        return None
