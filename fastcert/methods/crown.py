"""Training on linear-relaxation (CROWN) bounds, with the relaxation-tightening regularisers of
Zhu et al. 2020 (:mod:`fastcert.relaxation`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, robust_ce_from_margins
from fastcert.methods.base import Batch, Method, Ramp, StepOutput, mix, natural_step
from fastcert.relaxation import RForm, indicators, relaxed_margins
from fastcert.schedules import linear_coefficient


@dataclass
class RelaxationRegularized(Method):
    """The regularisers of Eq. 10 of Zhu et al. 2020 on top of a method's robust loss:

        L = L_rob + λ Σ_t d_t + γ Σ_t r_t   (d: Eq. 8, r: Eq. 9; per target class t),

    each weight going linearly start → end over the ε ramp (as κ and β do): 0 → λ warms a
    weight up (Zhu et al. App. B, Table 1: "λ and γ warm up from 0 … in the first 20 epochs"),
    γ → 0 phases it out (their CROWN-IBP setting, Tables 2-3). A weight that stays 0 switches
    its regulariser off; with both off nothing is computed. ``r_form``: Eq. 9 as printed
    (``literal``) or measured against the relaxation's own lower line (``generalised``; equal
    under the same-slope relaxation, see :mod:`fastcert.relaxation`)."""

    lambda_start: float = 0.0   # weight λ of d
    lambda_end: float = 0.0
    gamma_start: float = 0.0    # weight γ of r
    gamma_end: float = 0.0
    r_form: RForm = "literal"

    def __post_init__(self):
        weights = (self.lambda_start, self.lambda_end, self.gamma_start, self.gamma_end)
        if min(weights) < 0:
            raise ValueError("method.lambda_start/lambda_end/gamma_start/gamma_end must be >= 0")

    def weights(self, batch: Batch) -> tuple[float, float]:
        """(λ, γ) at this batch's point of the ε ramp."""
        return (linear_coefficient(self.lambda_start, self.lambda_end, batch.ratio),
                linear_coefficient(self.gamma_start, self.gamma_end, batch.ratio))

    def regularize(self, module, lin, C, batch: Batch, relu: str, loss: torch.Tensor,
                   stats: dict) -> torch.Tensor:
        """``loss`` + λ Σ_t d_t + γ Σ_t r_t, with the weights and the batch means of Σ_t d_t
        and Σ_t r_t added to ``stats``."""
        lam, gamma = self.weights(batch)
        ind = indicators(module, lin, C, batch.lower, batch.upper, relu, self.r_form)
        stats.update({"lambda_d": lam, "gamma_r": gamma, "reg/d": ind.d.sum(1).mean().detach(),
                      "reg/r": ind.r.sum(1).mean().detach()})
        return loss + ind.loss(lam, gamma)


@dataclass
class Crown(RelaxationRegularized):
    """Certified training on CROWN margin bounds (Zhang et al. 2018), the setting of Table 1 of
    Zhu et al. 2020 (there: the dual of Wong & Kolter 2018, i.e. the same-slope relaxation of
    Fast-Lin, Weng et al. 2018, on MLP 2x100 and small CNNs):

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲, y) + λ Σ_t d_t + γ Σ_t r_t,

    m̲ the CROWN lower bounds of the margins with ReLU relaxation ``relaxation`` (``same-slope``,
    the paper's; or ``adaptive``, auto_LiRPA's default CROWN) and κ (``kappa``, :class:`Ramp`)
    going start → end over the ramp. Full CROWN back-substitutes from every layer: small models
    only. At ε = 0 it is natural training."""

    relaxation: Literal["same-slope", "adaptive"] = "same-slope"
    kappa: Ramp = field(default_factory=Ramp)

    def step(self, net, batch):
        if batch.eps <= 0:
            return natural_step(net, batch)
        module = net.relaxed(self.relaxation)
        logits, C, lin = relaxed_margins(module, batch.x, batch.y, batch.lower, batch.upper,
                                         net.num_classes, Bound.CROWN)
        kappa = self.kappa.at(batch)
        natural = F.cross_entropy(logits, batch.y)
        robust = robust_ce_from_margins(lin.lower)
        loss = mix(natural, robust, kappa)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(), "kappa": kappa}
        if max(self.weights(batch)) > 0:
            loss = self.regularize(module, lin, C, batch, self.relaxation, loss, stats)
        return StepOutput(loss, logits.detach(), stats, (lin.lower > 0).all(1).detach(),
                          lin.relus if batch.diagnostics else None)
