"""The warmup regularisers of Shi et al. 2021 (Sec. 3.3.3, Eq. 10) as one config node,
``method.warmup``, held by every method that propagates IBP boxes and uses them: fast IBP and,
as CTBench does for its IBP-based methods (``--fast-reg``), SABR, TAPS/STAPS and the
expressive losses. Each reads the ReLU-input bounds of the box it propagated itself (the ε-box
for fast IBP and MTL-IBP, the small box for SABR).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, BoundedNet, ReluBounds
from fastcert.methods.base import Batch, StepOutput, natural_step
from fastcert.regularizers import layer_sums, relu_loss, tightness_loss
from fastcert.schedules import regularizer_weight


@dataclass
class Warmup:
    """The warmup regularisers of Shi et al. 2021 (Sec. 3.3.3 and Eq. 10):

        L = L_rob + λ(L_tightness + L_relu),  λ = λ0(1 - ε/ε_target) during warmup, 0 after,

    L_tightness (Eq. 7) and L_relu (Eq. 8) with tolerance τ (``tau``) on the bounds of the box
    the holding method propagated; ``tightness``/``relu`` switch each term on or off (the
    Table 4 ablation); ``lambda0 = 0`` switches both off.

    At ε = 0 (the natural phase) the holder does what the released code does
    (``certified.cert`` with ``--min-eps-reg``, :meth:`natural_phase_step`): the bounds for the
    regularisers are computed on the box of radius ``min_eps_reg`` (1e-6 in pixel units,
    clipped to the data range) and the loss is

        L = CE(f(x), y) + λ0 (L_tightness + L_relu),

    the clean cross entropy in place of the robust term, so that L_tightness and L_relu act from
    the first epoch (Table 3 of Shi et al. reports this small overhead in the ε = 0 phase). An
    empty box would make L_tightness a constant (:func:`fastcert.regularizers.tightness_loss`),
    so ``min_eps_reg`` must be positive.
    """

    lambda0: float = 0.5
    tau: float = 0.5
    tightness: bool = True
    relu: bool = True
    min_eps_reg: float = 1e-6

    def __post_init__(self):
        if not self.min_eps_reg > 0:
            raise ValueError(f"min_eps_reg={self.min_eps_reg}: must be > 0 (pixel units), "
                             f"e.g. method.warmup.min_eps_reg=1e-6")

    def weight(self, batch: Batch) -> float:
        """λ at this batch's ε (Eq. 10)."""
        return regularizer_weight(self.lambda0, batch.eps, batch.eps_target)

    def combine(self, tight: torch.Tensor, relu: torch.Tensor) -> torch.Tensor:
        """The switched-on terms: L_tightness + L_relu, or one of them."""
        return (tight if self.tightness else 0.0) + (relu if self.relu else 0.0)

    def add(self, loss: torch.Tensor, relus: Callable[[], list[ReluBounds]],
            input_width: torch.Tensor, batch: Batch
            ) -> tuple[torch.Tensor, list[ReluBounds] | None, dict]:
        """``loss + λ·combine(L_tightness, L_relu)`` at this batch's λ (:func:`regularize`)."""
        return regularize(loss, relus, input_width, self.weight(batch), self.tau, self.combine,
                          batch.diagnostics)

    def natural_phase_step(self, net: BoundedNet, batch: Batch) -> StepOutput:
        """The ε = 0 step (see the class docstring). With λ0 = 0 and off the diagnostic steps
        it is the plain ``nn.Module`` forward (:func:`fastcert.methods.base.natural_step`)."""
        if self.weight(batch) <= 0 and not batch.diagnostics:
            return natural_step(net, batch)
        lower, upper = batch.box(batch.x, self.min_eps_reg)
        logits, _ = net.margin_bounds(batch.x, batch.y, lower, upper, Bound.IBP)
        natural = F.cross_entropy(logits, batch.y)
        loss, relus, diagnostics = self.add(natural, net.relu_bounds, upper - lower, batch)
        return StepOutput(loss, logits.detach(), {"loss/natural": natural.detach()}, None, relus,
                          diagnostics)


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
        sums = layer_sums(bounds)
        tight = tightness_loss(input_width, sums, tau)
        relu = relu_loss(sums, tau)
    if lam > 0:
        loss = loss + lam * combine(tight, relu)
    if not diagnostics:
        return loss, None, {}
    return loss, bounds, {"reg/tightness": tight.detach(), "reg/relu": relu.detach()}
