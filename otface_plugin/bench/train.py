"""One training run in the plugin's own minimal loop, and its evaluation.

This loop stands in for the recipe's ``train_v2.py`` (documented as such in the report): same
loss call (``loss_fn(embeddings, labels)``, plus the ``layer4`` map for OTFace), SGD with
momentum and weight decay, a linear warm-up then the recipe's polynomial (power 2) decay, and the
recipe's flip-augmented ``.bin`` embedding. No DDP, no PartialFC sampling (all classes fit).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from otface_plugin import build_loss
from otface_plugin.bench.data import TrainSet, train_batches
from otface_plugin.bench.model import BenchNet
from otface_plugin.bench.spec import OTFACE_DEFAULTS, RunSpec, TrainConfig
from otface_plugin.features import FeatureCapture
from otface_plugin.losses.components import PARTS

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
    so all losses start from identical weights; the batches come from :func:`train_batches` with
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
    head = loss_fn.head if is_ot else loss_fn
    batches = train_batches(train, cfg.batch_size, cfg.K, spec.seed, cfg.steps, spec.sampler,
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
