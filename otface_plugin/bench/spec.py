"""What a study run is: the training budget every run of a study shares, and one run's identity
(loss, seed, ablation variant, sampler). Both routes train from these; the run key hashes them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from otface_plugin.data.sampler import DEFAULT_NUM_INSTANCES
from otface_plugin.losses.head import plugin_heads
from otface_plugin.losses.otface import otface_options

__all__ = ["LOSSES", "LOSS_CHOICES", "TrainConfig", "OTFACE_DEFAULTS", "RunSpec"]

LOSSES = ("arcface", "cosface", "otface")  # the default study
# every loss a study may name: the default ones and the margin heads the plugin adds (adaface, ...)
LOSS_CHOICES = LOSSES + tuple(sorted(plugin_heads()))


@dataclass
class TrainConfig:
    """Everything that makes runs comparable; the same for every loss of a study."""

    steps: int = 600
    P: int = 8
    K: int = DEFAULT_NUM_INSTANCES
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    scale: float = 32.0
    embedding_size: int = 128
    widths: Tuple[int, ...] = (16, 32, 64, 128)
    log_every: int = 10
    threads: int = 0  # 0: torch's default (in-process runs); parallel jobs use cpus // jobs

    @property
    def batch_size(self) -> int:
        return self.P * self.K


# OTFace options of the study: their own defaults, read where they are declared (warm-up is set
# in steps of the study's budget). These values go into the run keys.
OTFACE_OPTIONS = ("lambda_ot", "eps", "feature", "triplet_mode")
OTFACE_DEFAULTS: Dict[str, Any] = {name: otface_options()[name].default for name in OTFACE_OPTIONS}


@dataclass
class RunSpec:
    """One (loss, seed, ablation variant, sampler) run."""

    loss: str
    seed: int
    variant: str = "default"
    options: Dict[str, Any] = field(default_factory=dict)
    sampler: str = "pk"  # "hard": HardPKSampler on the margin head's class centres

    @property
    def name(self) -> str:
        tag = "" if self.sampler == "pk" else f"-{self.sampler}"
        return f"{self.loss}-{self.variant}{tag}-s{self.seed}"
