"""PGD adversarial training (Madry et al. 2018) and the attack step every method shares.

All training attacks are :meth:`fastcert.attacks.PGDConfig.run` (one PGD implementation). Where
a clean forward pass precedes the attack (PGD-AT, MTL/CC/Exp-IBP, TAPS's latent search), the
attack and the adversarial logits use that clean batch's BatchNorm statistics (CTBench's
convention, :meth:`fastcert.bounds.BoundedNet.batch_norm_stats`); SABR's centre search runs
before any clean pass and uses BatchNorm in eval mode (running statistics), as in SABR's code
(Müller et al. 2023, App. C: "During the PGD attack we use the BN layers in evaluation mode").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastcert.attacks import PGDConfig, pgd_attack
from fastcert.bounds import BoundedNet
from fastcert.methods.base import Method, Ramp, StepOutput, mix, natural_step


def attack_point(net: BoundedNet, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                 upper: torch.Tensor, cfg: PGDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on the plain module inside [lower, upper] with BatchNorm in eval mode (running
    statistics, none updated), accumulating no parameter gradient: (robust per example,
    attack point)."""
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


def clean_stats_point(net: BoundedNet, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                      upper: torch.Tensor, cfg: PGDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on the plain module inside [lower, upper] with BatchNorm normalising by the
    statistics of the clean pass just run through ``net.bounded`` (detached), updating no
    running statistics and accumulating no parameter gradient: (robust per example, attack
    point). For the callers that need the point only (SABR's ``search_bn=clean``, EDAC)."""
    with net.batch_norm_stats(detach=True):
        robust, x_adv = pgd_attack(net.model, x, y, lower, upper, cfg)
    return robust, x_adv.detach()


def clean_stats_attack(net: BoundedNet, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                       upper: torch.Tensor, cfg: PGDConfig, clean_logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD on the plain module inside [lower, upper] after the clean pass through
    ``net.bounded`` whose logits are ``clean_logits``: (robust per example, attack point
    x_adv, :func:`adversarial_logits` at x_adv).

    BatchNorm normalises with that clean pass's statistics (detached in the attack, which
    updates no running statistics and accumulates no parameter gradient; in the graph in the
    logits). The attack's last iterate is evaluated by :func:`adversarial_logits` itself (the
    same values): when it is x_adv, its logits are the answer, else one more forward pass at
    x_adv computes them."""
    final = functools.partial(adversarial_logits, net)
    with net.batch_norm_stats(detach=True):
        result = cfg.run(net.model, x, y, lower, upper, clean_logits=clean_logits, final=final)
    x_adv = result.x_adv.detach()
    logits = adversarial_logits(net, x_adv) if result.logits is None else result.logits
    return result.robust, x_adv, logits


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
        robust, _, adv_logits = clean_stats_attack(net, batch.x, batch.y, batch.lower,
                                                   batch.upper, self.attack, logits)
        adv = F.cross_entropy(adv_logits, batch.y)
        natural = F.cross_entropy(logits, batch.y)
        kappa = self.kappa.at(batch)
        stats = {"loss/natural": natural.detach(), "loss/adversarial": adv.detach(),
                 "acc/pgd": robust.float().mean(), "kappa": kappa}
        return StepOutput(mix(natural, adv, kappa), logits.detach(), stats)
