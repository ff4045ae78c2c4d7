"""The contract every registered margin head follows.

A head is two things built from one class:

- a **margin function** (a :class:`MarginHead` subclass): ``logits = margin(cosine, labels)``,
  the call arcface_torch's PartialFC_V2 makes as ``self.margin_softmax(logits, labels)`` on the
  gathered batch; it returns the scaled logits and may keep running statistics as buffers;
- a **standalone loss**: :class:`MarginSoftmaxLoss` over the head, registered with ``build_loss``
  under the head's name: a ``.weight`` of shape (num_classes, embedding_size), ``forward(embeddings,
  labels) -> loss``, softmax cross entropy over the margin function's logits. One loss class serves
  every head, the combined margin (ArcFace, CosFace) included.

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
from numbers import Real
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
from torch import distributed
from torch.nn import functional as F

from otface_plugin import registry
from otface_plugin.mining import IGNORE_LABEL, check_batch

__all__ = ["MarginHead", "MarginSoftmaxLoss", "HEADS", "MARGIN_PRESETS", "register_head", "build_margin",
           "margin_head", "margin_triple", "head_options", "heads_table", "plugin_heads"]

HEADS: Mapping[str, Type["MarginHead"]] = registry.view("head")  # the registry's head table, read-only

# (m1, m2, m3) as arcface_torch's config.margin_list.
MARGIN_PRESETS = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
}


class MarginHead(torch.nn.Module):
    """Base of the margin functions: ``forward(cosine (B, C), labels (B,) or (B, 1)) -> logits``.

    ``needs_norms``: the head reads :attr:`norms` (each row's embedding norm, detached), which
    its caller sets before every call. ``sharded``: the cosines are one rank's class columns of
    a class-parallel FC over a batch that every rank holds whole (PartialFC_V2).
    """

    needs_norms: bool = False
    # arcface_torch computes this head itself (its CombinedMarginLoss, from margin_list): the
    # recipe keeps its own and installs nothing
    in_recipe: bool = False
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a running statistic read back as NaN/inf would make every later loss NaN without a word
        for name, buffer in self._buffers.items():
            value = state_dict.get(prefix + name)
            if buffer is not None and buffer.is_floating_point() and isinstance(value, torch.Tensor) \
                    and not bool(torch.isfinite(value).all()):
                raise ValueError(f"checkpoint key {prefix + name!r} holds NaN/inf: the head's running "
                                 "statistic is corrupt; resume from an earlier checkpoint")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_norms(self, batch: int) -> torch.Tensor:
        if self.norms is None or self.norms.numel() != batch:
            got = None if self.norms is None else tuple(self.norms.shape)
            raise ValueError(
                f"{type(self).__name__} needs each sample's embedding norm ({batch} values, in the order of "
                f"the logits' rows), got {got}: set .norms before calling it (MarginSoftmaxLoss and the recipe hook do)"
            )
        return self.norms.detach().view(-1).to(torch.float32)


def register_head(name: str):
    """Class decorator for a :class:`MarginHead`: registers it as a ``head`` and, as a ``loss`` of
    the same name, the :class:`MarginSoftmaxLoss` over it (``build_loss(name, num_classes=...,
    embedding_size=..., **head options)``)."""

    def decorator(cls: Type[MarginHead]) -> Type[MarginHead]:
        registry.register("head", name)(cls)
        registry.register_loss(name)(StandaloneLoss(name, cls))
        return cls

    return decorator


class StandaloneLoss:
    """The ``build_loss`` entry of a head: a :class:`MarginSoftmaxLoss` over that head, built from
    ``num_classes``, ``embedding_size`` and the head's own options."""

    def __init__(self, name: str, head: Type[MarginHead]) -> None:
        self.name, self.head = name, head
        self.__doc__ = f"Standalone ``{name}`` loss: :class:`MarginSoftmaxLoss` over :class:`{head.__name__}`."

    def __call__(self, num_classes: int, embedding_size: int = 512, **options) -> "MarginSoftmaxLoss":
        return MarginSoftmaxLoss(num_classes, embedding_size, build_margin(self.name, **options))

    def accepted_options(self) -> List[str]:
        """What the registry's option check reads (the loss's sizes, then the head's options)."""
        return ["num_classes", "embedding_size", *head_options(self.head)]

    def __repr__(self) -> str:
        return f"StandaloneLoss({self.name!r}, {self.head.__module__}.{self.head.__qualname__})"


class MarginSoftmaxLoss(torch.nn.Module):
    """Normalised linear classifier + a margin head + softmax cross entropy: the standalone loss
    of every head (inside arcface_torch, PartialFC_V2 plays this role).

    ``margin``: a :class:`MarginHead` (``build_margin("adaface", m=0.45)``), a registered head's
    name (its defaults), ``"arcface"``/``"cosface"`` or ``[m1, m2, m3]`` (the combined margin).
    The weight is initialised like PartialFC_V2's (normal, std 0.01). The loss is the mean over
    the samples with a label; labels ``-1`` are ignored, and a batch without any labelled sample
    (all ``-1``, or empty) gives 0 with zero gradients, never 0/0.
    """

    def __init__(self, num_classes: int, embedding_size: int = 512, margin: Any = "arcface") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.margin = margin_head(margin)
        # Same initialisation as PartialFC_V2.
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        # the detached cosines of the last forward: the OTFace loss's misclassified triplet mode reads them
        self._last_cosine: Optional[torch.Tensor] = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        num_classes, embedding_size = self.weight.shape
        labels = check_batch(embeddings, labels, embedding_size).long()
        check_label_range(labels, num_classes)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            if self.margin.needs_norms:
                self.margin.norms = x.detach().norm(dim=1)
            cosine = F.linear(F.normalize(x), F.normalize(self.weight.float())).clamp(-1, 1)
            self._last_cosine = cosine.detach()
            logits = self.margin(cosine, labels)
            total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
            return total / (labels != -1).sum().clamp(min=1)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"num_classes={c}, embedding_size={d}"


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Labels in ``-1 .. num_classes - 1``, else one ValueError line (one host read per step; the
    margin's own ``-1`` filter reads anyway)."""
    if labels.numel():
        bounds = torch.aminmax(labels)
        low, high = int(bounds.min), int(bounds.max)
        if high >= num_classes or low < IGNORE_LABEL:
            raise ValueError(f"labels hold class {high if high >= num_classes else low}, outside 0 .. "
                             f"{num_classes - 1} (num_classes={num_classes}); -1 marks no label")


def margin_head(margin: Any, s: Optional[float] = None, what: str = "margin") -> MarginHead:
    """The :class:`MarginHead` a ``margin`` option names: a head as it is (with its own scale), a
    registered head's name, ``"arcface"``/``"cosface"`` or ``[m1, m2, m3]`` (the combined margin),
    these with the scale ``s`` when given; else a ValueError naming ``what``."""
    if isinstance(margin, MarginHead):
        return margin
    scale = {} if s is None else {"s": s}
    if isinstance(margin, str) and margin.strip().lower() in registry.entries("head"):
        return build_margin(margin, **scale)
    m1, m2, m3 = margin_triple(margin, what)
    return build_margin("combined", m1=m1, m2=m2, m3=m3, **scale)


def margin_triple(value: Any, what: str = "margin") -> Tuple[float, float, float]:
    """``(m1, m2, m3)`` of a preset name (:data:`MARGIN_PRESETS`) or of three numbers; else a
    ValueError naming ``what`` (OTFaceLoss's ``margin``, a config's ``margin_list``, ...)."""
    if isinstance(value, str):
        if value not in MARGIN_PRESETS:
            raise ValueError(f"{what} must be arcface, cosface, a margin head ({', '.join(sorted(HEADS))}) "
                             f"or [m1, m2, m3], got {value!r}")
        return MARGIN_PRESETS[value]
    try:
        triple = tuple(value)
    except TypeError:
        triple = ()
    if len(triple) != 3 or not all(isinstance(m, Real) and not isinstance(m, bool) for m in triple):
        raise ValueError(f"{what} must be three numbers [m1, m2, m3], got {value!r}")
    m1, m2, m3 = (float(m) for m in triple)
    return m1, m2, m3


def plugin_heads() -> Mapping[str, Type[MarginHead]]:
    """The heads the recipe trains by installing them into PartialFC_V2: every registered head but
    those arcface_torch computes itself from ``margin_list`` (:attr:`MarginHead.in_recipe`)."""
    return {name: cls for name, cls in registry.entries("head").items() if not cls.in_recipe}


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
