"""The OTFace loss: margin softmax plus an optimal-transport term on hard triplets.

Qian et al., "OTFace: Hard Samples Guided Optimal Transport Loss for Deep Face Representation",
IEEE TMM 2022, arXiv:2203.14461. From the abstract: hard sample groups are found by a triplet
scheme in each mini-batch, optimal transport measures the distribution differences of their
high-level convolutional features, and the OT term is added to a margin-based softmax. The
concrete choices here (batch-hard mining, per-image descriptor distributions, cosine cost,
entropic Sinkhorn, hinge on W(a,p) - W(a,n)) are this project's; see docs/loss.md, "Method".
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch.nn import functional as F

from otface_plugin.losses.components import COMPONENTS
from otface_plugin.losses.grad_share import GradShareProbe, share_and_cosine
from otface_plugin.losses.head import MarginSoftmaxLoss, margin_head
from otface_plugin.mining import (TRIPLET_MODES, FiniteWatch, Triplets, check_batch, check_triplets, mine_triplets,
                                  most_violating, require_finite, select_triplets)
from otface_plugin.ot import cosine_cost, pick_method, sinkhorn
from otface_plugin.registry import refuse_unknown, register_loss

__all__ = ["OTFaceLoss", "OTFaceTerm", "otface_loss", "otface_options"]

FEATURES = ("conv", "embedding")
OT_FORMS = ("hinge", "softplus")
# how the Sinkhorn loop runs; anything but "none" also pads the triplets to fixed shapes
OT_COMPILE = {"none": "eager", "compile": "compile", "cudagraph": "cudagraph"}
COSINE_COST_SPAN = 2.0  # cosine costs of unit vectors lie in [0, 2]
MIN_EPS = 1e-4
AUTO_LAMBDA = "auto"
AUTO_LAMBDA_START = 1.0  # where lambda_ot="auto" starts (then clamped into lambda_range)


class OTFaceTerm(torch.nn.Module):
    """The unweighted OT term ``L_OT`` on the hard triplets of a batch.

    ``feature="conv"``: each image is a uniform distribution over its local descriptors
    (L2-normalised): the H*W positions of a (B, C, H, W) conv map, or the L tokens of a
    (B, L, D) token set (a ViT's patch tokens); for every hard triplet the loss is
    ``max(0, W(a, p) - W(a, n) + ot_margin)``, averaged. ``feature="embedding"``: one OT problem
    between the set of hard anchors' embeddings and the set of their positives, one with their
    negatives, and the same hinge on the two costs.

    ``ot_compile="compile"`` or ``"cudagraph"``: every anchor of the batch gets a triplet slot
    (``max_triplets`` slots when set), the hard ones masked in, so the OT problems keep one
    shape from step to step and the step has no host synchronisation; the Sinkhorn loop then
    runs through ``torch.compile`` or as a captured CUDA graph (eager off CUDA). Same loss value.
    NaN/inf inputs raise the eager path's :class:`~otface_plugin.mining.NonFiniteError` there too:
    in the same step off CUDA; on CUDA, where waiting for the check would be the host sync this
    path avoids, at the first host read after the step (the next forward, or ``components()``),
    see :class:`~otface_plugin.mining.FiniteWatch`.

    Which triplets are hard, and the ``max_triplets`` cap, are :mod:`otface_plugin.mining`'s rule
    (``select_triplets``, ``most_violating``) on both paths. :meth:`components` reads what the
    last forward did.
    """

    def __init__(
        self,
        eps: float = 0.05,
        iters: int = 50,
        feature: str = "conv",
        triplet_mode: str = "hard",
        triplet_margin: float = 0.1,
        ot_margin: float = 0.05,
        ot_form: str = "hinge",
        grad: str = "envelope",
        eps_start: Optional[float] = None,
        max_triplets: Optional[int] = None,
        ot_compile: str = "none",
    ) -> None:
        super().__init__()
        _check_choice("feature", feature, FEATURES)
        _check_choice("ot_compile", ot_compile, tuple(OT_COMPILE))
        _check_choice("triplet_mode", triplet_mode, TRIPLET_MODES)
        _check_choice("ot_form", ot_form, OT_FORMS)
        _check_choice("grad", grad, ("envelope", "autodiff"))
        _check_positive("eps", eps)
        if eps < MIN_EPS:
            raise ValueError(
                f"OTFace option eps={eps!r} is below {MIN_EPS}: with cosine costs the float32 Sinkhorn plan "
                "loses its precision there (exp of differences of numbers ~2/eps); use eps >= 1e-4"
            )
        _check_finite("triplet_margin", triplet_margin)
        _check_finite("ot_margin", ot_margin)
        if eps_start is not None:
            _check_positive("eps_start", eps_start)
        if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
            raise ValueError(f"OTFace option iters must be a positive integer, got {iters!r}")
        if max_triplets is not None and not (isinstance(max_triplets, int) and not isinstance(max_triplets, bool)
                                             and max_triplets >= 1):
            raise ValueError(f"OTFace option max_triplets must be a positive integer or None, got {max_triplets!r}")
        self.eps, self.iters, self.feature = float(eps), iters, feature
        self.triplet_mode, self.triplet_margin = triplet_mode, float(triplet_margin)
        self.ot_margin, self.ot_form, self.grad = float(ot_margin), ot_form, grad
        self.eps_start, self.max_triplets = eps_start, max_triplets
        self.ot_compile = ot_compile
        # Cosine costs have a known span, so the solver's method is fixed without a host sync.
        self.method = pick_method(COSINE_COST_SPAN, self.eps)
        small_span = self.method == "scaling"
        self.loop = OT_COMPILE[ot_compile] if small_span else "eager"
        self._last: Dict[str, torch.Tensor | float] = {}  # read through components()
        self._finite = FiniteWatch()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, features: Optional[torch.Tensor] = None,
                logits: Optional[torch.Tensor] = None, indices_tuple: Optional[Triplets] = None) -> torch.Tensor:
        """``L_OT`` of the batch. ``indices_tuple``: your own ``(anchors, positives, negatives)``
        index tensors (a pytorch-metric-learning triplet miner's output) instead of this term's
        mining; ``triplet_mode``, ``triplet_margin`` and ``logits`` then play no part, and
        ``max_triplets`` still keeps the most violating ones. Such triplets take the eager path
        (their count changes from step to step) whatever ``ot_compile`` says; same loss value."""
        labels = check_batch(embeddings, labels)
        if self.feature == "conv":
            if features is None:
                raise ValueError(
                    "OTFace feature='conv' needs the backbone's conv feature maps (B, C, H, W) or token sets "
                    "(B, L, D): pass features=..., e.g. from otface_plugin.features.FeatureCapture, or set "
                    "feature='embedding'"
                )
            if features.dim() not in (3, 4) or features.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"conv features must be (B, C, H, W) maps or (B, L, D) token sets with B={labels.shape[0]}, "
                    f"got {tuple(features.shape)}"
                )
        zero = torch.zeros((), device=embeddings.device)
        loop = self.loop
        if self.ot_compile == "none" or indices_tuple is not None:
            if self.feature == "conv":  # NaN/inf is an error (mining checks the embeddings)
                require_finite("conv features", features)
            if indices_tuple is None:
                a, p, n = mine_triplets(embeddings, labels, self.triplet_mode, self.triplet_margin, logits=logits)
            else:
                require_finite("embeddings", embeddings)  # as mining would
                a, p, n = check_triplets(indices_tuple, labels.shape[0], embeddings.device)
                loop = "eager"
            a, p, n = self._cap(embeddings, a, p, n)
            mask = None
            # the count is on the host already (mining synchronised): no device copy per step
            self._last = {"triplets": float(a.numel()), "w_ap": zero, "w_an": zero}
            if a.numel() == 0:
                return zero
        else:
            # the eager path's checks, in its order, without a host sync on a device (FiniteWatch)
            if self.feature == "conv":
                self._finite.check("conv features", features)
            self._finite.check("embeddings", embeddings)
            a, p, n, mask = self._mine_fixed(embeddings, labels, logits)
            self._last = {"triplets": mask.sum(), "w_ap": zero, "w_an": zero}

        # Normalise once per image, then one batched cost for the (a, p) and (a, n) problems.
        if self.feature == "conv":
            desc = _unit_float(_descriptor_sets(features))  # (B, N, D)
            sources, targets = desc[torch.cat([a, a])], desc[torch.cat([p, n])]
        else:
            e = _unit_float(embeddings)
            sources, targets = torch.stack([e[a], e[a]]), torch.stack([e[p], e[n]])
        cost = cosine_cost(sources, targets, normalize=False)
        weights = None
        if mask is not None and self.feature == "embedding":
            # one problem over the selected anchors: padded slots weigh 0 (uniform when none is)
            count = mask.sum()
            weights = torch.where(count > 0, mask / count.clamp(min=1.0), torch.full_like(mask, 1.0 / mask.numel()))
            weights = weights.expand(2, -1)
            mask = (count > 0).float().view(1)
        w = sinkhorn(cost, weights, weights, eps=self.eps, iters=self.iters, grad=self.grad,
                     eps_start=self.eps_start, method=self.method, loop=loop).cost
        w_ap, w_an = w.chunk(2)
        gap = w_ap - w_an + self.ot_margin
        per_triplet = F.relu(gap) if self.ot_form == "hinge" else F.softplus(gap)
        if mask is None:
            self._last.update(w_ap=w_ap.detach().mean(), w_an=w_an.detach().mean())
            return per_triplet.mean()
        count = mask.sum().clamp(min=1.0)  # embedding: the one problem, or none
        self._last.update(w_ap=(w_ap.detach() * mask).sum() / count, w_an=(w_an.detach() * mask).sum() / count)
        return (per_triplet * mask).sum() / count

    @torch.no_grad()
    def _mine_fixed(self, embeddings, labels, logits):
        """Every anchor as a triplet slot and a float mask of the ones the hardness rule selects
        (:func:`~otface_plugin.mining.select_triplets`, no ``nonzero``: no host sync);
        ``max_triplets`` keeps that many slots, the most violating selected ones first."""
        x = F.normalize(embeddings.detach().float(), dim=1)
        p, n, select = select_triplets(x @ x.t(), labels, self.triplet_mode, self.triplet_margin, logits)
        a = torch.arange(x.shape[0], device=x.device)
        if self.max_triplets is not None and self.max_triplets < x.shape[0]:
            keep = most_violating(x, (a, p, n), self.max_triplets, select)
            a, p, n, select = a[keep], p[keep], n[keep], select[keep]
        return a, p, n, select.float()

    def _cap(self, embeddings, a, p, n):
        """The ``max_triplets`` most violating triplets (:func:`~otface_plugin.mining.most_violating`)."""
        if self.max_triplets is None or a.numel() <= self.max_triplets:
            return a, p, n
        x = F.normalize(embeddings.detach().float(), dim=1)
        keep = most_violating(x, (a, p, n), self.max_triplets)
        return a[keep], p[keep], n[keep]

    def components(self) -> Dict[str, float]:
        """The last forward's ``triplets`` (how many took part), ``w_ap`` and ``w_an`` (their mean
        OT costs), as floats; reading them synchronises with the device."""
        self._finite.raise_pending()
        return {k: float(v) for k, v in self._last.items()}


class OTFaceLoss(torch.nn.Module):
    """``L = L_margin + lambda * L_OT`` with a linear warm-up of lambda.

    The constructor takes the options a user tunes:

    - the margin part: ``num_classes``, ``embedding_size``, ``margin`` (``"arcface"``,
      ``"cosface"``, ``[m1, m2, m3]``, a registered head's name such as ``"adaface"``, or a
      :class:`~otface_plugin.losses.head.MarginHead`) and its scale ``s``: an own
      :class:`~otface_plugin.losses.head.MarginSoftmaxLoss`; or ``head``, a module or function
      ``head(embeddings, labels) -> margin loss`` (inside arcface_torch: its PartialFC_V2), which
      then replaces those four. Either is stored as the submodule ``margin_loss`` (the name
      checkpoints hold) and read as :attr:`head`;
    - the weight: ``lambda_ot`` (a number, or ``"auto"``: lambda follows the target gradient
      share ``grad_share``), ``warmup_steps`` (linear warm-up from 0);
    - the OT term: ``eps``, ``iters``, ``triplet_margin`` (which triplets are hard), ``ot_margin``
      (the hinge on ``W(a,p) - W(a,n)``) and ``feature`` (``"conv"`` maps or ``"embedding"``).

    The solver and mining knobs are :class:`OTFaceTerm`'s and go through ``term_options``
    (``triplet_mode``, ``ot_form``, ``grad``, ``eps_start``, ``max_triplets``, ``ot_compile``); the
    gradient-share probe's through ``probe_options`` (``measure_grad_share``, ``lambda_range``,
    ``lambda_rate``, see :class:`~otface_plugin.losses.grad_share.GradShareProbe`). A config's
    flat ``otface:`` mapping of all of them builds the loss through ``build_loss("otface", ...)``
    (:func:`otface_loss`), which splits it by :func:`otface_options`.

    What the last step did is read through :meth:`components` (floats; after the backward it
    includes the OT term's gradient share ``||d(lambda L_OT)/dF|| / ||d L_margin/dF||`` at the
    features the term reads, and the cosine of the two).

    State: the step counter ``step`` (so a resumed run continues the warm-up) and, with
    ``lambda_ot="auto"``, the lambda ``lambda_auto`` and the gradient statistics ``grad_stats``
    it follows (the same on every rank: the statistics are all-reduced; a resumed run continues
    exactly). A checkpoint with a corrupt value or of the other lambda mode is refused on load.

    ``triplet_mode="misclassified"`` without ``logits=`` reads the cosines of the own margin
    softmax (PartialFC_V2 hands none over).
    """

    def __init__(
        self,
        num_classes: Optional[int] = None,
        embedding_size: int = 512,
        margin: Any = "arcface",
        s: float = 64.0,
        lambda_ot: float | str = 0.1,
        warmup_steps: int = 0,
        grad_share: float = 0.3,
        eps: float = 0.05,
        iters: int = 50,
        triplet_margin: float = 0.1,
        ot_margin: float = 0.05,
        feature: str = "conv",
        head: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        term_options: Optional[Mapping[str, Any]] = None,
        probe_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.adaptive = lambda_ot == AUTO_LAMBDA
        if not self.adaptive:
            if isinstance(lambda_ot, str):
                raise ValueError(f"OTFace option lambda_ot must be a number >= 0 or {AUTO_LAMBDA!r}, got {lambda_ot!r}")
            _check_finite("lambda_ot", lambda_ot)
            if lambda_ot < 0:
                raise ValueError(f"OTFace option lambda_ot must be >= 0, got {lambda_ot!r}")
        _check_positive("grad_share", grad_share)
        if isinstance(warmup_steps, bool) or not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"OTFace option warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        term_options = _check_passed_options("term_options", term_options, TERM_OPTIONS)
        probe_options = _check_passed_options("probe_options", probe_options, PROBE_OPTIONS)
        self._probe = GradShareProbe(**probe_options)
        if self.adaptive and not self._probe.measure_grad_share:
            raise ValueError("OTFace option lambda_ot='auto' follows the measured gradient share: it needs "
                             "measure_grad_share=True")
        if head is None:
            if num_classes is None:
                raise ValueError("OTFaceLoss needs either num_classes (an own margin softmax) or head (a margin "
                                 "head, e.g. PartialFC_V2)")
            head = MarginSoftmaxLoss(num_classes, embedding_size, margin_head(margin, s))
        elif not callable(head):
            raise TypeError(f"head must be callable (embeddings, labels) -> loss, got {type(head)}")
        self.margin_loss = head  # the checkpoint name (state dict keys margin_loss.*); read it as .head
        self.ot_term = OTFaceTerm(eps=eps, iters=iters, feature=feature, triplet_margin=triplet_margin,
                                  ot_margin=ot_margin, **term_options)
        self.warmup_steps = warmup_steps
        self.grad_share = float(grad_share)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # the gradient statistics of the last step (grad_share.STATS); with a fixed lambda only a
        # diagnostic (not in the state dict, so checkpoints keep their keys), with "auto" the input of
        # the next update (saved, so a resumed run makes the update the uninterrupted one would)
        self.register_buffer("grad_stats", torch.zeros(4), persistent=self.adaptive)
        if self.adaptive:
            self.lambda_ot = AUTO_LAMBDA
            low, high = self._probe.lambda_range
            self.register_buffer("lambda_auto", torch.tensor(min(max(AUTO_LAMBDA_START, low), high)))
        else:
            self.lambda_ot = float(lambda_ot)
        self._probe.stats = self.grad_stats
        self._last: Dict[str, torch.Tensor | float] = {}  # read through components()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checked before anything is loaded: a refused checkpoint leaves the loss as it was. The
        # lambda mode is refused with strict=False too: torch hands every module strict=True.
        if self.adaptive and prefix + "lambda_auto" not in state_dict and prefix + "step" in state_dict:
            raise ValueError(f"checkpoint has no key {prefix + 'lambda_auto'!r}: it was trained with a fixed "
                             f"lambda_ot, this loss has lambda_ot={AUTO_LAMBDA!r}; set lambda_ot to that run's number "
                             "to resume it (or start a new run for the adaptive lambda)")
        if not self.adaptive and prefix + "lambda_auto" in state_dict:
            raise ValueError(f"checkpoint key {prefix + 'lambda_auto'!r} holds an adaptive lambda "
                             f"(lambda_ot={AUTO_LAMBDA!r}), this loss has lambda_ot={self.lambda_ot}; set lambda_ot: "
                             f"{AUTO_LAMBDA} to resume that run (or start a new run for a fixed lambda)")
        _check_loaded_buffers(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def head(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The margin head, ``head(embeddings, labels) -> loss`` (stored as ``margin_loss``)."""
        return self.margin_loss

    @head.setter
    def head(self, value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.margin_loss = value

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._probe.stats = self.grad_stats  # .to(device) replaced the buffer
        return out

    def current_lambda(self) -> torch.Tensor:
        """lambda at the current step, as a 0-d tensor on the step buffer's device (no sync)."""
        base = self.lambda_auto if self.adaptive else torch.full((), self.lambda_ot, device=self.step.device)
        if self.warmup_steps == 0:
            return base.clone()
        return base * (self.step.float() / self.warmup_steps).clamp(max=1.0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, features: Optional[torch.Tensor] = None,
                logits: Optional[torch.Tensor] = None, indices_tuple: Optional[Triplets] = None) -> torch.Tensor:
        """``L_margin + lambda * L_OT``; ``features``, ``logits`` and ``indices_tuple`` go to
        :meth:`OTFaceTerm.forward`."""
        # PartialFC_V2 squeezes its labels in place: it gets a copy, we keep a flat view.
        labels = check_batch(embeddings, labels).detach()
        margin_part = self.head(embeddings, labels.clone())
        if logits is None and indices_tuple is None and self.ot_term.triplet_mode == "misclassified":
            # the own standalone loss hands its cosines over; an outside head (PartialFC_V2) has none
            logits = self.head._last_cosine if isinstance(self.head, MarginSoftmaxLoss) else None
            if logits is None:
                raise ValueError(
                    "triplet_mode='misclassified' needs logits: pass logits=..., indices_tuple=... or use a "
                    "loss built with num_classes (its own margin softmax hands its cosines over)"
                )
        learning = self.training and torch.is_grad_enabled()  # a no_grad or eval forward changes nothing
        if learning and self.adaptive:
            with torch.no_grad():  # from the statistics of the previous step's backward
                self._probe.adapt(self.lambda_auto, self.grad_share)
        lam = self.current_lambda()
        if learning and self._probe.measure_grad_share:
            if self.ot_term.feature == "conv" and features is not None:
                features = self._probe.attach(features, lam)
            elif self.ot_term.feature == "embedding":
                embeddings = self._probe.attach(embeddings, lam)
        ot_part = self.ot_term(embeddings, labels, features, logits, indices_tuple)
        total = margin_part + lam * ot_part
        if self.training:
            self.step += 1
        self._last = {"loss": total.detach(), "margin": margin_part.detach(), "ot": ot_part.detach(),
                      "lambda": lam.detach()}
        return total

    def components(self) -> Dict[str, float]:
        """Last forward's parts as floats, keyed by :data:`~otface_plugin.losses.components.COMPONENTS`
        (loss, margin, ot, lambda, triplets, w_ap, w_an, and from the backward after it grad_share,
        grad_cos: NaN share before that backward).

        Reading them synchronises with the device: call it when logging, not every step.
        """
        term = self.ot_term.components()  # first: raises a fixed-shape step's NaN/inf error not raised yet
        share, cos = share_and_cosine(self.grad_stats)
        parts = {**{k: float(v) for k, v in self._last.items()}, **term, "grad_share": float(share),
                 "grad_cos": float(cos)}
        return {key: parts[key] for key in COMPONENTS if key in parts}


def _own_options(cls, skip=()) -> Dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and n not in skip}


# where each option is declared: OTFaceLoss's own (the tuned ones), the term's solver and mining
# knobs it does not take itself, the probe's; read from the signatures, never listed twice
PASSED_THROUGH = ("head", "term_options", "probe_options")
LOSS_OPTIONS = tuple(_own_options(OTFaceLoss, PASSED_THROUGH))
TERM_OPTIONS = tuple(_own_options(OTFaceTerm, LOSS_OPTIONS))
PROBE_OPTIONS = tuple(_own_options(GradShareProbe))


def otface_options() -> Dict[str, inspect.Parameter]:
    """Every option of the flat form (a config's ``otface:`` block, ``build_loss("otface", ...)``):
    name -> its parameter (with its default) where it is declared."""
    return {**_own_options(OTFaceLoss, PASSED_THROUGH), **_own_options(OTFaceTerm, LOSS_OPTIONS),
            **_own_options(GradShareProbe)}


@register_loss("otface")
def otface_loss(head: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                **options) -> OTFaceLoss:
    """:class:`OTFaceLoss` from one flat mapping of options (a config's ``otface:`` block):
    the term's and the probe's go to ``term_options`` and ``probe_options``."""
    refuse_unknown("loss 'otface'", options, ["head", *otface_options()])
    return OTFaceLoss(head=head, **{k: v for k, v in options.items() if k in LOSS_OPTIONS},
                      term_options={k: v for k, v in options.items() if k in TERM_OPTIONS},
                      probe_options={k: v for k, v in options.items() if k in PROBE_OPTIONS})


def _check_passed_options(name: str, options: Optional[Mapping[str, Any]], accepted) -> Dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"OTFaceLoss {name} must be a mapping of options ({', '.join(accepted)}), got {options!r}")
    refuse_unknown(f"OTFaceLoss {name}", options, list(accepted))
    return dict(options)


def _check_loaded_buffers(state_dict, prefix: str) -> None:
    """The loss's own buffers in a checkpoint: a ValueError naming the key for a value no run writes."""
    step = state_dict.get(prefix + "step")
    if isinstance(step, torch.Tensor) and (step.numel() != 1 or step.is_floating_point() or int(step) < 0):
        raise ValueError(f"checkpoint key {prefix + 'step'!r} holds {step.tolist()}: the step count must be an "
                         "integer >= 0; the checkpoint is corrupt")
    lam = state_dict.get(prefix + "lambda_auto")
    if isinstance(lam, torch.Tensor) and (lam.numel() != 1 or not math.isfinite(float(lam)) or float(lam) <= 0):
        raise ValueError(f"checkpoint key {prefix + 'lambda_auto'!r} holds {lam.tolist()}: the adaptive lambda must "
                         "be a finite number > 0; the checkpoint is corrupt")
    stats = state_dict.get(prefix + "grad_stats")
    if isinstance(stats, torch.Tensor) and not bool(torch.isfinite(stats).all()):
        raise ValueError(f"checkpoint key {prefix + 'grad_stats'!r} holds NaN/inf ({stats.tolist()}): the gradient "
                         "statistics the adaptive lambda follows are corrupt; resume from an earlier checkpoint")


def _descriptor_sets(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D): a (B, C, H, W) map as its H*W local descriptors, a (B, L, D) token set as is."""
    return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised over the last dim, at least float32 even under autocast (fp16 maps overflow)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"OTFace option {name} must be one of {choices}, got {value!r}")


def _check_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"OTFace option {name} must be a finite number, got {value!r}")


def _check_positive(name, value):
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"OTFace option {name} must be > 0, got {value!r}")
