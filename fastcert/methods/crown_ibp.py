"""CROWN-IBP training (Zhang et al. 2020), with loss fusion (Xu et al. 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fastcert.bounds import Mix, robust_ce_from_margins
from fastcert.methods.base import Method, StepOutput, mix, natural_step
from fastcert.schedules import linear_coefficient


@dataclass
class CrownIBP(Method):
    """CROWN-IBP (Zhang et al. 2020): margin bounds β·CROWN-IBP + (1-β)·IBP, β going
    β_start → β_end over the ramp, natural CE mixed in with κ_start → κ_end:

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲_β, y)   (Eq. 9 and Sec. 4 of Zhang et al. 2020).

    ``loss_fusion=true`` bounds the CE directly (Xu et al. 2020; O(1) instead of O(K) backward
    passes): the form Shi et al. 2021 use as their baseline, where the IBP weight is ε/ε_target
    (i.e. β = 1 - ε/ε_target, the defaults). ``loss_fusion=false`` bounds the K-1 margins.
    """

    loss_fusion: bool = True
    beta_start: float = 1.0
    beta_end: float = 0.0
    kappa_start: float = 0.0
    kappa_end: float = 0.0

    def step(self, net, batch):
        if batch.eps <= 0:
            return natural_step(net, batch)
        beta = linear_coefficient(self.beta_start, self.beta_end, batch.ratio)
        kappa = linear_coefficient(self.kappa_start, self.kappa_end, batch.ratio)
        bound = Mix(beta)
        if self.loss_fusion:
            natural, robust, logits = net.fused_ce(batch.x, batch.y, batch.lower, batch.upper,
                                                   bound)
            natural, robust = natural.mean(), robust.mean()
            verified = None
        else:
            logits, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, bound)
            natural = F.cross_entropy(logits, batch.y)
            robust = robust_ce_from_margins(lb)
            logits, verified = logits.detach(), (lb > 0).all(1).detach()
        loss = mix(natural, robust, kappa)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(),
                 "kappa": kappa, "beta": beta}
        relus = net.relu_bounds(fused=self.loss_fusion) if batch.diagnostics else None
        return StepOutput(loss, logits, stats, verified, relus)
