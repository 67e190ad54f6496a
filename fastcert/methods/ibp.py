"""Interval bound propagation training: vanilla IBP and the fast IBP of Shi et al. 2021, and the
steps the other IBP-based methods build on (:func:`ibp_step`, :func:`fast_ibp_step`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from fastcert.bounds import Bound, BoundedNet, robust_ce_from_margins
from fastcert.methods.base import Batch, Method, Ramp, StepOutput, mix, natural_step
from fastcert.methods.warmup import Warmup


def ibp_step(net: BoundedNet, batch: Batch, kappa: Ramp, warmup: Warmup) -> StepOutput:
    """Robust CE on the IBP margin bounds of the batch's box, natural CE mixed in by κ, plus the
    warmup regularisers on that box's bounds:

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲, y) + λ(L_tightness + L_relu)

    (Eq. 9 and Eq. 10 of Shi et al. 2021). ``verified``: IBP-verified on the batch's box."""
    logits, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)
    kappa_value = kappa.at(batch)
    natural = F.cross_entropy(logits, batch.y)
    robust = robust_ce_from_margins(lb)
    loss = mix(natural, robust, kappa_value)
    stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(),
             "kappa": kappa_value}
    loss, relus, diagnostics = warmup.add(loss, net.relu_bounds, batch.upper - batch.lower, batch)
    return StepOutput(loss, logits.detach(), stats, (lb > 0).all(1).detach(), relus, diagnostics)


def fast_ibp_step(net: BoundedNet, batch: Batch, kappa: Ramp, warmup: Warmup) -> StepOutput:
    """Fast IBP's step on the batch's box: :meth:`Warmup.natural_phase_step` at ε = 0, else
    :func:`ibp_step`; ``stats["lambda"]`` is the regulariser weight λ."""
    if batch.eps <= 0:
        out = warmup.natural_phase_step(net, batch)
    else:
        out = ibp_step(net, batch, kappa, warmup)
    out.stats["lambda"] = warmup.weight(batch)
    return out


@dataclass
class IBP(Method):
    """Vanilla IBP training (Gowal et al. 2018): robust CE on IBP margin bounds (Eq. 9 of
    Shi et al. 2021), optionally mixed with natural CE, κ (``kappa``) going start → end over
    the ramp:

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲, y),   m̲ the IBP lower bounds of the margins.

    At ε = 0 it is natural training (the bounds collapse to the clean output). The warmup
    regularisers, with tolerance ``tau``, are computed from the same bounds without gradient
    on diagnostic steps only (for Figs. 3-4 of Shi et al.); none is optimised.
    """

    kappa: Ramp = field(default_factory=Ramp)
    tau: float = 0.5  # tolerance τ of the plot-only regulariser values

    def step(self, net, batch):
        if batch.eps <= 0:
            return natural_step(net, batch)
        return ibp_step(net, batch, self.kappa, Warmup(lambda0=0.0, tau=self.tau))


@dataclass
class FastIBP(Method):
    """IBP training with the warmup regularisers of Shi et al. 2021 (Sec. 3.3.3, Eq. 10):

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲, y) + λ(L_tightness + L_relu),
        λ = λ0(1 - ε/ε_target) during warmup, 0 after,

    ``warmup`` the regularisers (:class:`Warmup`: λ0, τ, the Table 4 switches and the ε = 0
    phase on the ``min_eps_reg`` box of the released code), ``kappa`` the natural-CE weight
    (:class:`Ramp`; Shi et al. use 0). IBP initialisation and full BatchNorm are the
    model-side parts of the method (``init=ibp``, which conf/method/fast.yaml selects, and
    ``model.bn=full``).
    """

    kappa: Ramp = field(default_factory=Ramp)
    warmup: Warmup = field(default_factory=Warmup)

    def step(self, net, batch):
        return fast_ibp_step(net, batch, self.kappa, self.warmup)
