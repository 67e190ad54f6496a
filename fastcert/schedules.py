"""ε warmup schedules and the coefficients that follow them (κ, β, λ).

A schedule is written like the papers' tables: "start+length+rest" epochs, e.g. "1+20+49"
for CIFAR-10 in Table 1 of Shi et al. 2021: ``start`` epochs at ε=0, a ramp over ``length``
epochs updated every batch, then ε_target for the rest of training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PHASES = ("eps0", "ramp", "final")


@dataclass(frozen=True)
class EpsSchedule:
    """ε as a function of the global batch index: ``start`` epochs at 0, a ramp over ``length``
    epochs (updated every batch), then ``eps_target``. Subclasses give the ramp
    (:meth:`_eps`). ``eps_target`` and ``steps_per_epoch`` are supplied by the run (the radius
    and the number of batches of the training loader), not by the config.
    """

    start: int = 0
    length: int = 0
    eps_target: float = 0.0
    steps_per_epoch: int = 1

    def __post_init__(self):
        if self.eps_target < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps_target}")
        if self.start < 0 or self.length < 0:
            raise ValueError(f"schedule.start and schedule.length must be >= 0, got "
                             f"{self.start} and {self.length}")
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")

    @property
    def ramp_steps(self) -> tuple[int, int]:
        """First and last-plus-one global step of the ramp."""
        begin = self.start * self.steps_per_epoch
        return begin, begin + self.length * self.steps_per_epoch

    def eps(self, step: int) -> float:
        """ε used for global batch ``step`` (0-based, counted over the whole run)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._eps(step)

    def _eps(self, step: int) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def phase(self, epoch: int) -> str:
        """Which of the three phases epoch ``epoch`` (0-based) belongs to (Table 3)."""
        if epoch < self.start:
            return "eps0"
        if epoch < self.start + self.length:
            return "ramp"
        return "final"

    @property
    def warmup_epochs(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class LinearSchedule(EpsSchedule):
    """ε grows linearly over the ramp, by ε_target/N each batch (N = length·steps_per_epoch
    ramp batches): the first ramp batch has ε_target/N, the last ε_target."""

    def progress(self, step: int) -> float:
        """Fraction of the ramp completed after ``step`` (0-based), in [0, 1]."""
        begin, end = self.ramp_steps
        if step < begin:
            return 0.0
        if end == begin or step >= end - 1:
            return 1.0
        return (step - begin + 1) / (end - begin)

    def _eps(self, step: int) -> float:
        return self.eps_target * self.progress(step)


@dataclass(frozen=True)
class SmoothedSchedule(EpsSchedule):
    """auto_LiRPA's ``SmoothedScheduler`` (Xu et al. 2020, after DeepMind's IBP code), which
    Shi et al. 2021's released code uses for every run, value for value. With
    S = ``start``·L, E = (``start`` + ``length``)·L (L = ``steps_per_epoch``), the joint
    M = int((E − S)·``mid``) + S and p = ``exponent``, global batch ``step`` (0-based) has

        ε = 0                                                  step ≤ S
        ε = a·(step − S)^p                                     S < step < M
        ε = min(ε_M + (ε_target − ε_M)·(step − M)/(E − M), ε_target)      step ≥ M

    with a = ε_target / ((E − M)·p·(M − S)^(p−1) + (M − S)^p) and ε_M = a·(M − S)^p, so the
    linear part continues the power part's slope at M (ε_M = 0.0769·ε_target for mid 0.25,
    exponent 4). Hence ε = 0 for the ``start`` epochs and for the first batch of the next one,
    then the ramp, and ε = ε_target from the first batch of epoch ``start + length`` (0-based).

    ``start`` counts the epochs at ε = 0, as in the papers' "1+20+49" and in
    :class:`LinearSchedule`; auto_LiRPA's ``start`` option is one more (``start=2,length=20``
    there is ``start: 1, length: 20`` here). A ramp shorter than 1/``mid`` batches has M = S:
    it is linear from 0. ``length: 0`` means ε_target from batch S on.
    """

    mid: float = 0.25
    exponent: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mid < 1 or self.exponent < 1:
            raise ValueError("schedule.mid must be in (0, 1) and schedule.exponent >= 1")

    def _eps(self, step: int) -> float:
        init, final = self.ramp_steps
        target, p = self.eps_target, self.exponent
        if final == init:
            return target if step >= init else 0.0
        if step <= init:
            return 0.0
        mid = int((final - init) * self.mid) + init
        if mid > init:
            t = (mid - init) ** (p - 1.0)
            alpha = target / ((final - mid) * p * t + (mid - init) * t)
        else:
            alpha = 0.0
        if step < mid:
            return alpha * float(step - init) ** p
        mid_value = alpha * (mid - init) ** p
        return min(mid_value + (target - mid_value) * (step - mid) / (final - mid), target)


def linear_coefficient(start: float, end: float, ratio: float) -> float:
    """start + (end - start)·ratio, with ratio = ε/ε_target clipped to [0, 1].

    Used for κ (``method.kappa.start`` → ``method.kappa.end`` over the ramp, Zhang et al. 2020
    Sec. 4) and β (``beta_start`` → ``beta_end``, 1 → 0).
    """
    ratio = min(max(ratio, 0.0), 1.0)
    return start + (end - start) * ratio


def eps_ratio(eps: float, eps_target: float) -> float:
    """ε/ε_target, defined as 1 when ε_target is 0 (nothing to ramp)."""
    return 1.0 if eps_target <= 0 else min(eps / eps_target, 1.0)


def regularizer_weight(lambda0: float, eps: float, eps_target: float) -> float:
    """λ = λ0·(1 - ε/ε_target) during warmup and 0 after (Sec. 3.4, Eq. 10 of Shi et al. 2021)."""
    r = eps_ratio(eps, eps_target)
    return 0.0 if r >= 1.0 or math.isclose(r, 1.0) else lambda0 * (1.0 - r)
