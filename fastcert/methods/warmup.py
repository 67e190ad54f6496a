"""The warmup regularisers of Shi et al. 2021 (Sec. 3.3.3, Eq. 10) added to any method that
propagates IBP boxes: IBP / fast IBP, and, as CTBench does for its IBP-based methods
("--fast-reg"), SABR, TAPS/STAPS and the expressive losses.

The weight λ and the switches are the method's (:class:`fastcert.methods.FastIBP`: λ0,
``tightness``, ``relu``); :func:`regularize` reads the ReLU-input bounds of the box the method
itself propagated (the ε-box for IBP and MTL-IBP, the small box for SABR).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastcert.bounds import ReluBounds
from fastcert.regularizers import relu_loss, tightness_loss


def regularize(loss: torch.Tensor, relus: Callable[[], list[ReluBounds]],
               input_width: torch.Tensor, lam: float, tau: float,
               combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               diagnostics: bool) -> tuple[torch.Tensor, list[ReluBounds] | None, dict]:
    """``loss + lam·combine(L_tightness, L_relu)`` (Eqs. 7, 8 and 10 of Shi et al. 2021) from
    the bounds ``relus()`` of the box of widths ``input_width`` just propagated.

    Returns (loss, ReLU bounds, plot-only values), the last two only when ``diagnostics``.
    The regularisers are computed only when ``lam > 0`` (with gradient) or on diagnostic
    steps (without)."""
    if lam <= 0 and not diagnostics:
        return loss, None, {}
    bounds = relus()
    with torch.set_grad_enabled(lam > 0 and torch.is_grad_enabled()):
        tight = tightness_loss(input_width, bounds, tau)
        relu = relu_loss(bounds, tau)
    if lam > 0:
        loss = loss + lam * combine(tight, relu)
    if not diagnostics:
        return loss, None, {}
    return loss, bounds, {"reg/tightness": tight.detach(), "reg/relu": relu.detach()}
