"""Expressive losses (De Palma et al., ICLR 2024): MTL-IBP, CC-IBP and Exp-IBP, each a
family of losses between an adversarial loss (α = 0) and IBP's robust loss (α = 1)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastcert.attacks import PGDConfig
from fastcert.bounds import Bound, margin_spec, robust_ce_from_margins
from fastcert.methods.adversarial import clean_stats_attack
from fastcert.methods.base import Method, Ramp, StepOutput, mix
from fastcert.methods.ibp import fast_ibp_step
from fastcert.methods.warmup import Warmup


@dataclass
class _Expressive(Method):
    """Shared step: IBP margin bounds m̲ over the ε-box B_ε(x) (the clean pass sets the
    BatchNorm statistics), an attack point x_adv in the box of radius ``attack_eps_factor``·ε
    (De Palma et al.'s ``--attack_eps_factor``, CTBench's ``--attack-range-scale``), its
    logits with the clean statistics, then ``combine`` (the method's loss) mixed with natural
    CE by κ (``kappa``, :class:`Ramp`; CTBench's robust weight w = 1 - κ; De Palma et al. use
    κ = 0), plus the warmup regularisers of Shi et al. 2021 on the ε-box bounds (``warmup``,
    :class:`Warmup`; ``--method=fast`` in their code, λ0 = 0.5). At ε = 0 it trains as fast
    IBP (:func:`fastcert.methods.ibp.fast_ibp_step`). ``attack``: their default, one CE step of
    10 × the half-width from a random start (a box vertex in the gradient's sign pattern).
    ``verified``: IBP-verified (sound); ``acc/pgd``: the attack's training accuracy."""

    alpha: float = 0.5
    attack_eps_factor: float = 1.0
    attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=1, restarts=1, step_size=10.0, loss="ce", random_start=True))
    kappa: Ramp = field(default_factory=Ramp)
    warmup: Warmup = field(default_factory=Warmup)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: must be in [0, 1]")
        if self.attack_eps_factor <= 0:
            raise ValueError(f"attack_eps_factor={self.attack_eps_factor}: must be > 0")

    def combine(self, ibp_margins: torch.Tensor, adv_logits: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every subclass has it
        raise NotImplementedError

    def step(self, net, batch):
        if batch.eps <= 0:
            return fast_ibp_step(net, batch, self.kappa, self.warmup)
        logits, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)
        if self.attack_eps_factor == 1:
            lower, upper = batch.lower, batch.upper
        else:
            lower, upper = batch.box(batch.x, self.attack_eps_factor * batch.eps)
        robust_pgd, _, adv_logits = clean_stats_attack(net, batch.x, batch.y, lower, upper,
                                                       self.attack, logits)
        robust = self.combine(lb, adv_logits, batch.y)
        natural = F.cross_entropy(logits, batch.y)
        kappa = self.kappa.at(batch)
        lam = self.warmup.weight(batch)
        loss, relus, diagnostics = self.warmup.add(
            mix(natural, robust, kappa), net.relu_bounds, batch.upper - batch.lower, batch)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(),
                 "loss/ibp": robust_ce_from_margins(lb).detach(),
                 "loss/adversarial": F.cross_entropy(adv_logits, batch.y).detach(),
                 "acc/pgd": robust_pgd.float().mean(), "kappa": kappa, "lambda": lam}
        return StepOutput(loss, logits.detach(), stats, (lb > 0).all(1).detach(), relus,
                          diagnostics)


@dataclass
class MTLIBP(_Expressive):
    """MTL-IBP (De Palma et al., ICLR 2024; ``train.py`` of their code):
    L = α·L_IBP + (1-α)·L_adv, with L_IBP = CE(-m̲, y) on the ε-box and L_adv = CE(f(x_adv), y).
    α = 1 is IBP, α = 0 is PGD training (with this attack)."""

    def combine(self, ibp_margins, adv_logits, y):
        ibp = robust_ce_from_margins(ibp_margins)
        adv = F.cross_entropy(adv_logits, y)
        return self.alpha * ibp + (1 - self.alpha) * adv


@dataclass
class CCIBP(_Expressive):
    """CC-IBP (De Palma et al., ICLR 2024; ``train.py`` of their code): CE of the convex
    combination of the IBP margin bounds and the adversarial margins, per example and class,

        L = CE(-(α·m̲ + (1-α)·m(x_adv)), y),   m(x_adv)_j = f(x_adv)_y - f(x_adv)_j.
    """

    def combine(self, ibp_margins, adv_logits, y):
        spec = margin_spec(y, adv_logits.shape[1])
        adv_margins = torch.einsum("bjk,bk->bj", spec, adv_logits)
        return robust_ce_from_margins(self.alpha * ibp_margins + (1 - self.alpha) * adv_margins)


@dataclass
class ExpIBP(_Expressive):
    """Exp-IBP (De Palma et al., ICLR 2024; ``train.py`` of their code):
    L = L_adv^(1-α) · L_IBP^α, the exponents on the batch-mean losses as in their code."""

    def combine(self, ibp_margins, adv_logits, y):
        ibp = robust_ce_from_margins(ibp_margins)
        adv = F.cross_entropy(adv_logits, y)
        return ibp ** self.alpha * adv ** (1 - self.alpha)
