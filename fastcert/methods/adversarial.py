"""PGD adversarial training (Madry et al. 2018) and the attack step every method shares.

All training attacks are :func:`fastcert.attacks.pgd_attack` (one PGD implementation). Where
a clean forward pass precedes the attack (PGD-AT, MTL/CC/Exp-IBP, TAPS's latent search), the
attack and the adversarial logits use that clean batch's BatchNorm statistics (CTBench's
convention, :meth:`fastcert.bounds.BoundedNet.batch_norm_stats`); SABR's centre search runs
before any clean pass and uses BatchNorm in eval mode (running statistics), as in SABR's code
(Müller et al. 2023, App. C: "During the PGD attack we use the BN layers in evaluation mode").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastcert.attacks import PGDConfig, pgd_attack
from fastcert.bounds import BoundedNet
from fastcert.methods.base import Method, Ramp, StepOutput, mix, natural_step


def attack_point(net: BoundedNet, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                 upper: torch.Tensor, cfg: PGDConfig, clean_stats: bool,
                 clean_logits: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on the plain module inside [lower, upper]: (robust per example, attack point).

    ``clean_stats``: BatchNorm normalises with the statistics of the clean pass just run
    through ``net.bounded`` (detached); else BatchNorm runs in eval mode. Either way the
    attack updates no running statistics and accumulates no parameter gradient.
    ``clean_logits``: that clean pass's logits at x (``clean_stats`` only: they are f(x) with
    the clean statistics), which spare the attack its own clean forward pass."""
    if clean_stats:
        with net.batch_norm_stats(detach=True):
            robust, x_adv = pgd_attack(net.model, x, y, lower, upper, cfg,
                                       clean_logits=clean_logits)
        return robust, x_adv.detach()
    if clean_logits is not None:
        raise ValueError("clean_logits are the clean pass's: only with clean_stats=True")
    was_training = net.model.training
    net.model.eval()
    try:
        robust, x_adv = pgd_attack(net.model, x, y, lower, upper, cfg)
    finally:
        net.model.train(was_training)
    return robust, x_adv.detach()


def adversarial_logits(net: BoundedNet, x_adv: torch.Tensor) -> torch.Tensor:
    """f(x_adv) with the clean batch's BatchNorm statistics (kept in the graph)."""
    with net.batch_norm_stats():
        return net.model(x_adv)


@dataclass
class PGDTraining(Method):
    """PGD adversarial training (Madry et al. 2018, Eq. 2.1), as CTBench runs it
    (``PGDModelWrapper``): cross entropy at the PGD point of the current ε-box,

        L = κ·CE(f(x), y) + (1-κ)·CE(f(x_adv), y),   x_adv = PGD_ce(B_ε(x)) ,

    κ (``kappa``, :class:`Ramp`) going start → end over the ramp (CTBench's robust weight
    w = 1 - κ; all its PGD
    scripts use w = 1). ``attack``: CTBench's defaults, CE objective, random start, 3
    restarts, T steps of s = max(0.25, 2/T) × the box half-width (T=10: 0.25). The clean pass
    sets the BatchNorm statistics used by the attack and the adversarial logits. At ε = 0 it
    is natural training. No certificate: ``verified`` is None; ``acc/pgd`` is the training
    PGD accuracy. (CTBench's EDAC pre-step, a second optimiser step per batch, is not
    implemented.)
    """

    attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=10, restarts=3, step_size=0.25, loss="ce", random_start=True))
    kappa: Ramp = field(default_factory=Ramp)

    def step(self, net, batch):
        if batch.eps <= 0:
            return natural_step(net, batch)
        logits = net(batch.x)  # the clean pass: sets the BatchNorm statistics
        robust, x_adv = attack_point(net, batch.x, batch.y, batch.lower, batch.upper,
                                     self.attack, clean_stats=True, clean_logits=logits)
        adv = F.cross_entropy(adversarial_logits(net, x_adv), batch.y)
        natural = F.cross_entropy(logits, batch.y)
        kappa = self.kappa.at(batch)
        stats = {"loss/natural": natural.detach(), "loss/adversarial": adv.detach(),
                 "acc/pgd": robust.float().mean(), "kappa": kappa}
        return StepOutput(mix(natural, adv, kappa), logits.detach(), stats)
