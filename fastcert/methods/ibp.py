"""Interval bound propagation training: vanilla IBP and the fast IBP of Shi et al. 2021."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, robust_ce_from_margins
from fastcert.methods.base import Batch, Method, StepOutput, mix, natural_step
from fastcert.methods.warmup import regularize
from fastcert.schedules import linear_coefficient, regularizer_weight


@dataclass
class IBP(Method):
    """Vanilla IBP training (Gowal et al. 2018): robust CE on IBP margin bounds (Eq. 9 of
    Shi et al. 2021), optionally mixed with natural CE, κ going κ_start → κ_end over the ramp:

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲, y),   m̲ the IBP lower bounds of the margins.

    At ε = 0 it is natural training (the bounds collapse to the clean output). The warmup
    regularisers are computed from the same bounds, without gradient, on diagnostic steps
    only (for Figs. 3-4 of Shi et al.).
    """

    kappa_start: float = 0.0
    kappa_end: float = 0.0
    tau: float = 0.5  # tolerance τ of the regularisers (plot-only values for vanilla IBP)

    def step(self, net, batch):
        if batch.eps <= 0:
            return natural_step(net, batch)
        return self._bounded_step(net, batch)

    def regularizer_weight(self, batch: Batch) -> float:
        """λ of the warmup regularisers; vanilla IBP optimises none."""
        return 0.0

    def _bounded_step(self, net, batch: Batch) -> StepOutput:
        logits, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)
        kappa = linear_coefficient(self.kappa_start, self.kappa_end, batch.ratio)
        natural = F.cross_entropy(logits, batch.y)
        robust = robust_ce_from_margins(lb)
        loss = mix(natural, robust, kappa)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(), "kappa": kappa}
        loss, relus, diagnostics = regularize(
            loss, net.relu_bounds, batch.upper - batch.lower, self.regularizer_weight(batch),
            self.tau, self.regularizer, batch.diagnostics)
        return StepOutput(loss, logits.detach(), stats, (lb > 0).all(1).detach(), relus,
                          diagnostics)

    def regularizer(self, tight: torch.Tensor, relu: torch.Tensor) -> torch.Tensor:
        return tight + relu


@dataclass
class FastIBP(IBP):
    """IBP training with the warmup regularisers of Shi et al. 2021 (Sec. 3.3.3, Eq. 10):

        L = L_rob + λ(L_tightness + L_relu),  λ = λ0(1 - ε/ε_target) during warmup, 0 after.

    IBP initialisation and full BatchNorm are the model-side parts of the method
    (``init=ibp``, ``model.bn=full``; conf/method/fast.yaml selects the former). ``tightness``/
    ``relu`` switch each regulariser on or off (the Table 4 ablation).

    At ε = 0 (the natural phase) it does what the released code does (``certified.cert`` with
    ``--min-eps-reg``): the bounds for the regularisers are computed on the box of radius
    ``min_eps_reg`` (1e-6 in pixel units, clipped to the data range) and the loss is

        L = CE(f(x), y) + λ0 (L_tightness + L_relu),

    the clean cross entropy in place of the robust term (the robust CE on the tiny box is not
    used), so that L_tightness and L_relu act from the first epoch (Table 3 of the paper
    reports this small overhead in the ε=0 phase). With λ0 = 0 (no regulariser) and off the
    diagnostic steps the ε=0 step is the plain ``nn.Module`` forward.
    """

    lambda0: float = 0.5
    tightness: bool = True
    relu: bool = True
    min_eps_reg: float = 1e-6

    def __post_init__(self):
        if not self.min_eps_reg > 0:
            raise ValueError(f"method.min_eps_reg={self.min_eps_reg}: must be > 0 (pixel units)")

    def step(self, net, batch):
        out = self._eps0_step(net, batch) if batch.eps <= 0 else self._bounded_step(net, batch)
        out.stats["lambda"] = self.regularizer_weight(batch)
        return out

    def _eps0_step(self, net, batch: Batch) -> StepOutput:
        if self.regularizer_weight(batch) <= 0 and not batch.diagnostics:
            return natural_step(net, batch)  # nothing to regularise: the plain forward
        lower, upper = batch.box(batch.x, self.min_eps_reg)
        logits, _ = net.margin_bounds(batch.x, batch.y, lower, upper, Bound.IBP)
        natural = F.cross_entropy(logits, batch.y)
        loss, relus, diagnostics = regularize(
            natural, net.relu_bounds, upper - lower, self.regularizer_weight(batch), self.tau,
            self.regularizer, batch.diagnostics)
        return StepOutput(loss, logits.detach(), {"loss/natural": natural.detach()}, None, relus,
                          diagnostics)

    def regularizer_weight(self, batch):
        return regularizer_weight(self.lambda0, batch.eps, batch.eps_target)

    def regularizer(self, tight, relu):
        return (tight if self.tightness else 0.0) + (relu if self.relu else 0.0)
