"""SABR: small adversarial bounding regions (Müller et al., ICLR 2023)."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from fastcert.attacks import PGDConfig
from fastcert.methods.adversarial import attack_point, clean_stats_point
from fastcert.methods.base import Batch, Method, Ramp, StepOutput
from fastcert.methods.ibp import fast_ibp_step
from fastcert.methods.warmup import Warmup


def small_box(lower: torch.Tensor, upper: torch.Tensor, center: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of half-width λ·(upper - lower)/2 around ``center`` projected into [lower,
    upper] (Alg. 1 of Müller et al. 2023; CTBench ``SmallBoxModelWrapper``):

        r = λ(ū - u̲)/2,   x' = clamp(center, u̲ + r, ū - r),   box = [x' - r, x' + r].

    Written through the offset s = x' - r - u̲ ∈ [0, (1-λ)(ū - u̲)] so that in floating point
    it lies inside [lower, upper] exactly and λ = 1 returns [lower, upper] itself."""
    width = upper - lower
    slack = (1 - lam) * width
    offset = torch.minimum((center - lower - lam * width / 2).clamp_min(0), slack)
    return lower + offset, upper - (slack - offset)


def check_lam(lam: float) -> None:
    """The small-box ratio λ = τ/ε must lie in (0, 1]."""
    if not 0 < lam <= 1:
        raise ValueError(f"lam={lam}: the small-box ratio τ/ε must be in (0, 1]")


#: How SABR's centre search normalises: BatchNorm in eval mode (SABR's code) or with the clean
#: batch's statistics (CTBench).
SearchBN = Literal["eval", "clean"]


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics restored on exit (in place: tied views stay tied)."""
    saved = [(b, b.detach().clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def propagation_box(net, batch: Batch, lam: float, attack: PGDConfig,
                    search_bn: SearchBN = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """SABR's small box inside the batch's ε-box (the ε-box itself when λ = 1): PGD over the
    ε-box, then :func:`small_box` around the attack point. ``search_bn``: the search runs with
    BatchNorm in eval mode (``eval``, SABR's code) or with the statistics of a clean pass over
    the batch (``clean``, CTBench's ``SmallBoxModelWrapper``: the step's clean pass sets them;
    here that pass leaves the running statistics as they were, so that they are updated once a
    step, by the step's own clean pass)."""
    if lam == 1:
        return batch.lower, batch.upper
    if search_bn == "clean" and net.training:
        with running_statistics_kept(net.model):
            net(batch.x)
            _, x_adv = clean_stats_point(net, batch.x, batch.y, batch.lower, batch.upper,
                                         attack)
    else:
        _, x_adv = attack_point(net, batch.x, batch.y, batch.lower, batch.upper, attack)
    return small_box(batch.lower, batch.upper, x_adv, lam)


def sabr_step(net, batch: Batch, lam: float, attack: PGDConfig, kappa: Ramp,
              warmup: Warmup, search_bn: SearchBN = "eval") -> StepOutput:
    """:func:`fast_ibp_step` on SABR's small box (on the batch itself at ε = 0); for λ < 1
    ``verified`` becomes ``stats["acc/small_box"]`` (the small box certifies nothing)."""
    if batch.eps <= 0:
        return fast_ibp_step(net, batch, kappa, warmup)
    lower, upper = propagation_box(net, batch, lam, attack, search_bn)
    out = fast_ibp_step(net, dataclasses.replace(batch, lower=lower, upper=upper), kappa, warmup)
    if lam < 1:
        out.stats["acc/small_box"] = out.verified.float().mean()
        out.verified = None
    return out


@dataclass
class SABR(Method):
    """SABR (Müller et al., ICLR 2023, Sec. 3 and Alg. 1): IBP on a small box of radius
    τ = λε inside the ε-box, centred near an adversarial example,

        x* = PGD_ce(B_ε(x)),  x' = clamp(x*, x̲ + τ, x̄ - τ),  L = CE(-m̲(B_τ(x')), y),

    with τ, x̲, x̄ taken per pixel from the clipped ε-box (τ = λ(x̄ - x̲)/2), so
    B_τ(x') ⊆ B_ε(x) (:func:`small_box`); λ = 1 is IBP. It holds the natural-CE weight
    ``kappa`` (:class:`Ramp`) and the warmup regularisers of Shi et al. 2021 (``warmup``,
    :class:`Warmup`) on the small box's bounds, as fast IBP does on the ε-box (CTBench
    ``--fast-reg``; SABR's own code uses them too, λ0 = 0.5). ``attack``: PGD over the whole
    ε-box maximising CE (SABR's code: 8 steps, initial step 0.5 of the half-width, 1
    restart; its step decays ×0.1 after steps 4 and 7 are not reproduced), with BatchNorm in
    eval mode (``search_bn: eval``, SABR's code) or with the clean batch's statistics
    (``clean``, CTBench's convention; its presets). ``verified`` is reported only for λ = 1
    (the small box is no certificate of the ε-box); ``acc/small_box`` is the small-box IBP
    accuracy.
    """

    lam: float = 0.4
    attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=8, restarts=1, step_size=0.5, loss="ce", random_start=True))
    kappa: Ramp = field(default_factory=Ramp)
    warmup: Warmup = field(default_factory=Warmup)
    search_bn: SearchBN = "eval"

    def __post_init__(self):
        check_lam(self.lam)

    def step(self, net, batch):
        return sabr_step(net, batch, self.lam, self.attack, self.kappa, self.warmup,
                         self.search_bn)
