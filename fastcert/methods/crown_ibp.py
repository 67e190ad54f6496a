"""CROWN-IBP training (Zhang et al. 2020), with loss fusion (Xu et al. 2020) and the
relaxation-tightening regularisers of Zhu et al. 2020."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from fastcert.bounds import Bound, Mix, beta_mix, compute_bounds, robust_ce_from_margins
from fastcert.methods.base import Ramp, StepOutput, mix, natural_step
from fastcert.methods.crown import RelaxationRegularized
from fastcert.methods.warmup import Warmup
from fastcert.relaxation import relaxed_margins
from fastcert.schedules import linear_coefficient


@dataclass
class CrownIBP(RelaxationRegularized):
    """CROWN-IBP (Zhang et al. 2020): margin bounds β·CROWN-IBP + (1-β)·IBP, β going
    β_start → β_end over the ramp, natural CE mixed in with κ (``kappa``, :class:`Ramp`):

        L = κ·CE(f(x), y) + (1-κ)·CE(-m̲_β, y)   (Eq. 9 and Sec. 4 of Zhang et al. 2020).

    ``loss_fusion=true`` bounds the CE directly (Xu et al. 2020; O(1) instead of O(K) backward
    passes): the form Shi et al. 2021 use as their baseline, where the IBP weight is ε/ε_target
    (i.e. β = 1 - ε/ε_target, the defaults). ``loss_fusion=false`` bounds the K-1 margins.

    With a λ or γ weight (see :class:`RelaxationRegularized`), d and r of Zhu et al. are added,
    measured on the CROWN-IBP part of the bound (IBP intermediate bounds, CROWN's adaptive
    relaxation for the output: their Tables 2-3 setting, where r is phased out during training,
    e.g. ``gamma_start=γ, gamma_end=0``). Without loss fusion the CROWN-IBP pass of the loss
    gives them; with it they take one more margin-bound pass, whose clean forward pass also
    updates BatchNorm's running statistics (twice per step with the fused one).

    ``warmup``: the warmup regularisers of Shi et al. 2021 (:class:`Warmup`) on the IBP
    intermediate bounds of the CROWN-IBP pass, as CTBench's CROWN-IBP scripts do
    (``--fast-reg``: the regulariser reads the box bounds its ``DeepPolyModelWrapper`` stores;
    at ε = 0 :meth:`Warmup.natural_phase_step`); ``lambda0 = 0`` (the default) switches them
    off.
    """

    loss_fusion: bool = True
    beta_start: float = 1.0
    beta_end: float = 0.0
    kappa: Ramp = field(default_factory=Ramp)
    warmup: Warmup = field(default_factory=lambda: Warmup(lambda0=0.0))

    def step(self, net, batch):
        if batch.eps <= 0:
            if self.warmup.lambda0 > 0:
                return self.warmup.natural_phase_step(net, batch)
            return natural_step(net, batch)
        beta = linear_coefficient(self.beta_start, self.beta_end, batch.ratio)
        kappa = self.kappa.at(batch)
        regularized = max(self.weights(batch)) > 0
        if self.loss_fusion:
            natural, robust, logits = net.fused_ce(batch.x, batch.y, batch.lower, batch.upper,
                                                   Mix(beta))
            natural, robust = natural.mean(), robust.mean()
            verified, relus = None, net.relu_bounds(fused=True) if batch.diagnostics else None
        if regularized:  # the CROWN-IBP margin bound with its A matrices
            clean, C, lin = relaxed_margins(net.bounded, batch.x, batch.y, batch.lower,
                                            batch.upper, net.num_classes, Bound.CROWN_IBP)
        if not self.loss_fusion:
            if regularized:  # β·CROWN-IBP + (1-β)·IBP from the same forward pass
                lb = lin.lower
                if beta < 1:
                    ibp, _ = compute_bounds(net.bounded, Bound.IBP, C=C, bound_upper=False)
                    lb = beta_mix(lin.lower, ibp, beta)
                relus = lin.relus if batch.diagnostics else None
            else:
                clean, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper,
                                              Mix(beta))
                relus = net.relu_bounds() if batch.diagnostics else None
            natural = F.cross_entropy(clean, batch.y)
            robust = robust_ce_from_margins(lb)
            logits, verified = clean.detach(), (lb > 0).all(1).detach()
        loss = mix(natural, robust, kappa)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(),
                 "kappa": kappa, "beta": beta}
        diagnostics = {}
        if self.warmup.lambda0 > 0:  # the IBP intermediate bounds of the pass just run
            loss, warm, diagnostics = self.warmup.add(
                loss, lambda: net.relu_bounds(fused=self.loss_fusion), batch.upper - batch.lower,
                batch)
            relus = warm if warm is not None else relus
            stats["lambda"] = self.warmup.weight(batch)
        if regularized:
            loss = self.regularize(net.bounded, lin, C, batch, "adaptive", loss, stats)
        return StepOutput(loss, logits, stats, verified, relus, diagnostics)
