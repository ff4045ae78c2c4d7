"""The contract every registered margin head follows.

A head is two things built from one class:

- a **margin function** (a :class:`MarginHead` subclass): ``logits = margin(cosine, labels)``,
  the call arcface_torch's PartialFC_V2 makes as ``self.margin_softmax(logits, labels)`` on the
  gathered batch; it returns the scaled logits and may keep running statistics as buffers;
- a **standalone loss** (:class:`HeadLoss`, registered with ``build_loss`` under the head's
  name): a ``.weight`` of shape (num_classes, embedding_size), ``forward(embeddings, labels)
  -> loss``, softmax cross entropy over the margin function's logits.

The options of a head are the keyword arguments of its margin class's ``__init__``: the
registry's option check, the recipe's config check (``head_options``) and the docs table
(:func:`heads_table`) all read that one signature.

Inside PartialFC_V2 the classes are split across ranks (model parallel): every rank sees the
whole gathered batch but only its own class columns, and a row whose class lives elsewhere has
label ``-1``. A head whose formula needs every sample's target cosine (CurricularFace,
ElasticFace+) reads it through :meth:`MarginHead.global_targets`, which all-reduces the per-rank
values when :attr:`MarginHead.sharded` is set (the recipe hook sets it).
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List, Mapping, Optional, Tuple, Type

import torch
from torch import distributed
from torch.nn import functional as F

from otface_plugin import registry

__all__ = ["MarginHead", "HeadLoss", "HEADS", "register_head", "build_margin", "head_options", "heads_table"]

HEADS: Mapping[str, Type["MarginHead"]] = registry.view("head")  # the registry's head table, read-only


class MarginHead(torch.nn.Module):
    """Base of the margin functions: ``forward(cosine (B, C), labels (B,) or (B, 1)) -> logits``.

    ``needs_norms``: the head reads :attr:`norms` (each row's embedding norm, detached), which
    its caller sets before every call. ``sharded``: the cosines are one rank's class columns of
    a class-parallel FC over a batch that every rank holds whole (PartialFC_V2).
    """

    needs_norms: bool = False
    paper: str = ""
    verified: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.sharded = False
        self.norms: Optional[torch.Tensor] = None

    @staticmethod
    def targets(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat labels, the rows with a target here and their target columns."""
        labels = labels.view(-1).long()
        rows = torch.nonzero(labels != -1, as_tuple=False).view(-1)
        return labels, rows, labels[rows]

    def global_targets(self, cosine: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """(target cosine (B,), has-target mask (B,)) of every row, detached; summed over the
        ranks when sharded, so every rank sees every sample's target cosine."""
        with torch.no_grad():
            both = torch.zeros(2, cosine.shape[0], dtype=torch.float32, device=cosine.device)
            both[0, rows] = cosine[rows, cols].float()
            both[1, rows] = 1.0
            if self.sharded and distributed.is_available() and distributed.is_initialized():
                distributed.all_reduce(both)
        return both[0].to(cosine.dtype), both[1] > 0

    def check_norms(self, batch: int) -> torch.Tensor:
        if self.norms is None or self.norms.numel() != batch:
            got = None if self.norms is None else tuple(self.norms.shape)
            raise ValueError(
                f"{type(self).__name__} needs each sample's embedding norm ({batch} values, in the order of "
                f"the logits' rows), got {got}: set .norms before calling it (HeadLoss and the recipe hook do)"
            )
        return self.norms.detach().view(-1).to(torch.float32)


def register_head(name: str):
    """Class decorator for a :class:`MarginHead`: registers it as a ``head`` and its standalone
    :class:`HeadLoss` as a ``loss`` of the same name (``build_loss(name, num_classes=..., ...)``)."""

    def decorator(cls: Type[MarginHead]) -> Type[MarginHead]:
        registry.register("head", name)(cls)
        loss_cls = type(f"{cls.__name__}Loss", (HeadLoss,), {"margin_class": cls, "__doc__": (
            f"Standalone ``{name}`` loss: a normalised linear classifier and :class:`{cls.__name__}`.")})
        loss_cls.__init__ = _loss_init(cls)
        loss_cls.__module__ = cls.__module__
        registry.register_loss(name)(loss_cls)
        cls.loss_class = loss_cls
        return cls

    return decorator


class HeadLoss(torch.nn.Module):
    """Normalised linear classifier + a margin head + softmax cross entropy (labels -1 ignored).

    The weight is initialised like PartialFC_V2's (normal, std 0.01). After each forward,
    ``last_cosine`` holds the detached cosines (OTFace's ``misclassified`` triplet mode reads it).
    """

    margin_class: Type[MarginHead] = MarginHead

    def __init__(self, num_classes: int, embedding_size: int = 512, **options) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.margin = self.margin_class(**options)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.last_cosine: Optional[torch.Tensor] = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.view(-1).long()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            if self.margin.needs_norms:
                self.margin.norms = x.detach().norm(dim=1)
            cosine = F.linear(F.normalize(x), F.normalize(self.weight.float())).clamp(-1, 1)
            self.last_cosine = cosine.detach()
            logits = self.margin(cosine, labels)
            return F.cross_entropy(logits, labels, ignore_index=-1)


def _loss_init(margin_cls: Type[MarginHead]):
    """An ``__init__`` whose signature lists the margin's options, so ``build_loss`` checks them."""

    def __init__(self, num_classes: int, embedding_size: int = 512, **options) -> None:
        HeadLoss.__init__(self, num_classes, embedding_size, **options)

    own = list(inspect.signature(__init__).parameters.values())[:3]
    extra = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in head_options(margin_cls).values()]
    __init__.__signature__ = inspect.Signature(own + extra)
    return __init__


def head_options(cls: Type[MarginHead]) -> Dict[str, inspect.Parameter]:
    """The head's options (name -> parameter with its default): its ``__init__`` keywords."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_margin(name: str, **options) -> MarginHead:
    """The margin function of head ``name``; unknown names and options are errors."""
    cls = registry.lookup("head", name)
    registry.check_options(f"head {name!r}", cls, options)
    return cls(**options)


def heads_table() -> str:
    """The README's table of heads (name, options with defaults, paper, what was verified)."""
    rows: List[str] = ["| head | options (defaults) | paper | verified |", "|---|---|---|---|"]
    for name in sorted(HEADS):
        cls = HEADS[name]
        opts = ", ".join(f"`{n}={p.default}`" for n, p in head_options(cls).items())
        rows.append(f"| `{name}` | {opts} | {cls.paper} | {cls.verified} |")
    return "\n".join(rows)


def check_number(head: str, name: str, value, low: float = -math.inf, low_open: bool = False,
                 high: float = math.inf) -> float:
    """A finite real option within [low, high] (low excluded when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{head} option {name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{head} option {name} must be {bound}, got {value!r}")
    return float(value)
