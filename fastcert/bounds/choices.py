"""What a bound is asked for: the bound propagation methods (:class:`Bound`, :class:`Mix`), the
margin specification, the robust cross entropy of the margin bounds, and the ReLU-input
bounds a bound computation leaves."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastcert.bounds.lirpa import auto_lirpa

if TYPE_CHECKING:
    from auto_LiRPA import BoundedModule


class Bound(enum.Enum):
    """A bound propagation method (the value is auto_LiRPA's name for it)."""

    IBP = "IBP"                       # Gowal et al. 2018
    CROWN_IBP = "CROWN-IBP"           # Zhang et al. 2020: CROWN on the output, IBP inside
    CROWN = "CROWN"                   # Zhang et al. 2018
    ALPHA_CROWN = "CROWN-Optimized"   # Xu et al. 2021 (α-CROWN): optimised ReLU slopes

    @property
    def key(self) -> str:
        """The name used in configs and results: ibp, crown_ibp, crown, alpha_crown."""
        return self.name.lower()

    @classmethod
    def parse(cls, key: str | Bound) -> Bound:
        if isinstance(key, Bound):
            return key
        try:
            return cls[str(key).upper()]
        except KeyError:
            raise ValueError(f"unknown verifier {key!r}; choose from "
                             f"{[b.key for b in cls]}") from None


@dataclass(frozen=True)
class Mix:
    """β·CROWN-IBP + (1-β)·IBP (Eq. 9 of Zhang et al. 2020): CROWN-IBP training's bound."""

    beta: float


BoundChoice = Bound | Mix


def beta_mix(tight: torch.Tensor, ibp: torch.Tensor, beta: float) -> torch.Tensor:
    """β·tight + (1-β)·ibp: a convex combination of two bounds on the same side is a bound on
    that side (Eq. 9 of Zhang et al. 2020)."""
    return beta * tight + (1 - beta) * ibp


def compute_bounds(module: BoundedModule, bound: BoundChoice, **kwargs):
    """``module.compute_bounds(x=None, ...)`` for one bound choice (the input of the forward
    pass just run); a :class:`Mix` computes IBP, and CROWN-IBP when β > 0, and mixes them."""
    if isinstance(bound, Bound):
        return module.compute_bounds(x=None, method=bound.value, **kwargs)
    if bound.beta >= 1:
        return module.compute_bounds(x=None, method=Bound.CROWN_IBP.value, **kwargs)
    lb, ub = module.compute_bounds(x=None, method=Bound.IBP.value, **kwargs)
    if bound.beta <= 0:
        return lb, ub
    clb, cub = module.compute_bounds(x=None, method=Bound.CROWN_IBP.value, **kwargs)
    return (None if clb is None else beta_mix(clb, lb, bound.beta),
            None if cub is None else beta_mix(cub, ub, bound.beta))


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Specification matrix C (B, K-1, K) with rows e_y - e_j for every j != y.

    ``C @ logits`` gives the margins [f(x)]_y - [f(x)]_j of Eq. 2 of Shi et al. 2021; the
    example is verified when every lower bound of them is > 0.
    """
    eye = torch.eye(num_classes, device=y.device, dtype=torch.float32)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j is e_y - e_j
    keep = ~torch.eye(num_classes, dtype=torch.bool, device=y.device)[y]  # drop j == y
    return C[keep].view(y.shape[0], num_classes - 1, num_classes)


def robust_ce_from_margins(margin_lb: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Robust cross entropy of Gowal et al. 2018 (Eq. 9 of Shi et al. 2021).

    With m̲_j the lower bounds of the margins y - j, the logits z̃ with z̃_y = 0 and
    z̃_j = -m̲_j upper-bound every logit difference, so CE(z̃, y) >= max_δ CE(f(x+δ), y).
    """
    zeros = margin_lb.new_zeros(margin_lb.shape[0], 1)
    logits = torch.cat([zeros, -margin_lb], dim=1)
    target = torch.zeros(margin_lb.shape[0], dtype=torch.long, device=margin_lb.device)
    return F.cross_entropy(logits, target, reduction=reduction)


@dataclass
class ReluBounds:
    """Interval bounds [lower, upper] of one ReLU's input (a pre-activation h_i)."""

    name: str
    lower: torch.Tensor
    upper: torch.Tensor


def relu_bounds_of(module: BoundedModule) -> list[ReluBounds]:
    """Bounds of every ReLU's input from ``module``'s last bound computation, forward order."""
    out = []
    for node in module.modules():
        if isinstance(node, auto_lirpa().BoundRelu):
            pre = node.inputs[0]
            if getattr(pre, "lower", None) is None or getattr(pre, "upper", None) is None:
                raise RuntimeError("relu_bounds() needs a bound computation first")
            out.append(ReluBounds(pre.name, pre.lower, pre.upper))
    return out
