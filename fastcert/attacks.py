"""PGD under L∞ (Madry et al. 2018), inside the same clipped box the verifiers bound.

Every iterate is projected onto [lower, upper] — the box the bounds are computed over — so an
attack can never "escape" a certificate: verified ⇒ PGD-robust holds exactly, and a violation
means an unsound bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PGDConfig:
    """L∞ PGD: ``restarts`` runs of ``steps`` signed-gradient steps of ``step_size`` × the box
    half-width, maximising ``loss`` (``margin``: max_{j≠y} f_j - f_y; ``ce``: cross entropy),
    each from a uniformly random point of the box (``random_start``) or from x."""

    steps: int = 20
    restarts: int = 1
    step_size: float = 0.25  # fraction of the box half-width per step (2.5·ε/steps is common)
    loss: Literal["margin", "ce"] = "margin"
    random_start: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.restarts < 1 or self.step_size <= 0:
            raise ValueError(f"invalid PGD settings {self}: steps >= 0, restarts >= 1, "
                             f"step_size > 0")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j≠y} f_j - f_y per example: positive iff misclassified (the CW-style objective)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return margin_loss(logits, y)


def pgd_attack(model, x, y, lower, upper, cfg: PGDConfig = PGDConfig(),
               generator: torch.Generator | None = None):
    """Search the box for misclassified inputs. Returns (robust, x_adv).

    ``robust[i]`` is True iff the clean input and every restart's iterates were classified
    correctly; ``x_adv`` holds the point of largest ``cfg.loss`` found per example (the clean
    input when nothing beat it). The caller chooses the model's mode (eval: BatchNorm on
    running statistics, as evaluation requires).
    """
    with torch.no_grad():
        clean_logits = model(x)
        best_loss = _objective(clean_logits, y, cfg.loss)
        broken = margin_loss(clean_logits, y) > 0
    best_x = x.clone()
    half = (upper - lower) / 2
    for _ in range(cfg.restarts):
        if cfg.random_start:
            noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
            adv = (lower + noise * (upper - lower)).detach()
        else:
            adv = x.detach().clone()
        for step in range(cfg.steps + 1):  # evaluate every iterate, the last one included
            adv.requires_grad_(True)
            logits = model(adv)
            loss = _objective(logits, y, cfg.loss)
            with torch.no_grad():
                broken |= margin_loss(logits, y) > 0
                better = loss > best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_x[better] = adv[better].detach()
            if step == cfg.steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), adv)
            with torch.no_grad():
                adv = adv + cfg.step_size * half * grad.sign()
                adv = torch.max(torch.min(adv, upper), lower).detach()
    return ~broken, best_x
