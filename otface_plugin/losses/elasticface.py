"""ElasticFace: ArcFace / CosFace with a margin drawn afresh for every sample.

Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition", CVPRW 2022
(arXiv:2109.09416). Each sample's margin is drawn from N(m, std) at every step:
``elasticface_arc`` puts it on the angle (``cos(theta + m_i)``), ``elasticface_cos`` on the
cosine (``cos(theta) - m_i``); all logits times ``s``. With ``plus`` (ElasticFace+) the drawn
margins are sorted and handed out by the order of the samples' target cosines.

Conventions follow the authors' ``utils/losses.py`` (fdbtrs/ElasticFace): margins drawn with
``torch.normal`` from the default generator, one per sample with a target, unclamped; gradients
exact (through acos/cos for the angular head); for ``plus`` the assignment is the authors'
literal one: sorted ascending margins indexed by the descending argsort of the target cosines
(``margin_sorted[argsort_desc(cos_target)][i]`` for row i), which is what their published
models trained with. Defaults are the paper's: m = 0.5 (arc) / 0.35 (cos), std = 0.05.

Ranks: in the recipe every rank draws one margin per row of the gathered batch and uses those
of the rows whose class it holds, so each sample gets one N(m, std) draw from the rank that owns
its class. With ``plus`` the ranks need the same draws and every target cosine: rank 0's draws
are broadcast and the target cosines all-reduced, so the assignment is the one the authors'
head makes on the whole gathered batch.
"""
from __future__ import annotations


import torch
from torch import distributed

from otface_plugin.losses.head import MarginHead, check_number, register_head

__all__ = ["ElasticArcFaceMargin", "ElasticCosFaceMargin"]


class _ElasticMargin(MarginHead):
    paper = "Boutros et al., CVPRW 2022 (arXiv:2109.09416)"
    verified = ("loss and input/weight gradients = a reference written after the authors' losses.py with the "
                "same generator state (plain and plus), 1e-5; margin mean/std over 20k draws; PartialFC_V2 "
                "(2 gloo ranks, sample_rate 0.5, same generator state) = standalone")
    head = ""

    def __init__(self, m: float, std: float, s: float, plus: bool) -> None:
        super().__init__()
        self.m = check_number(self.head, "m", m, 0.0)
        self.std = check_number(self.head, "std", std, 0.0)
        self.s = check_number(self.head, "s", s, 0.0, low_open=True)
        if not isinstance(plus, bool):
            raise ValueError(f"{self.head} option plus must be true or false, got {plus!r}")
        self.plus = plus

    def margins(self, cosine: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The margin of each row with a target here, (len(rows),)."""
        sharded = self.sharded and distributed.is_available() and distributed.is_initialized()
        # standalone: one draw per labelled row, as the authors; sharded: one per gathered row
        count = cosine.shape[0] if sharded else rows.numel()
        drawn = torch.normal(mean=self.m, std=self.std, size=(count, 1), device=cosine.device).view(-1)
        if not self.plus:
            return drawn[rows] if sharded else drawn
        with torch.no_grad():
            if sharded:
                distributed.broadcast(drawn, src=0)
                target, has = self.global_targets(cosine, rows, cols)
                order = torch.sort(target[has], descending=True)[1]
                given = torch.zeros_like(target)
                given[has] = torch.sort(drawn[has])[0][order]
                return given[rows]
            order = torch.sort(cosine[rows, cols], descending=True)[1]
            return torch.sort(drawn)[0][order]

    def extra_repr(self) -> str:
        return f"m={self.m}, std={self.std}, s={self.s}, plus={self.plus}"


@register_head("elasticface_arc")
class ElasticArcFaceMargin(_ElasticMargin):
    head = "elasticface_arc"

    def __init__(self, m: float = 0.5, std: float = 0.05, s: float = 64.0, plus: bool = False) -> None:
        super().__init__(m, std, s, plus)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels, rows, cols = self.targets(labels)
        margin = self.margins(cosine, rows, cols).to(cosine.dtype)
        theta = torch.acos(cosine.clamp(-1, 1))
        theta = theta.index_put((rows, cols), theta[rows, cols] + margin)
        return torch.cos(theta) * self.s


@register_head("elasticface_cos")
class ElasticCosFaceMargin(_ElasticMargin):
    head = "elasticface_cos"

    def __init__(self, m: float = 0.35, std: float = 0.05, s: float = 64.0, plus: bool = False) -> None:
        super().__init__(m, std, s, plus)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels, rows, cols = self.targets(labels)
        margin = self.margins(cosine, rows, cols).to(cosine.dtype)
        cosine = cosine.clamp(-1, 1)
        return cosine.index_put((rows, cols), cosine[rows, cols] - margin) * self.s
