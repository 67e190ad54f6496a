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
    epochs (updated every batch), then ``eps_target``. Subclasses give the ramp's shape
    ``shape(t)`` for t in [0, 1]. ``eps_target`` and ``steps_per_epoch`` are supplied by the
    run (the radius and the training loader), not by the config.
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

    def shape(self, t: float) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def ramp_steps(self) -> tuple[int, int]:
        """First and last-plus-one global step of the ramp."""
        begin = self.start * self.steps_per_epoch
        return begin, begin + self.length * self.steps_per_epoch

    def progress(self, step: int) -> float:
        """Fraction of the ramp completed after ``step`` (0-based), in [0, 1]."""
        begin, end = self.ramp_steps
        if step < begin:
            return 0.0
        if end == begin or step >= end - 1:
            return 1.0
        return (step - begin + 1) / (end - begin)

    def eps(self, step: int) -> float:
        """ε used for global batch ``step``."""
        t = self.progress(step)
        if t in (0.0, 1.0):
            return self.eps_target * t
        return self.eps_target * min(1.0, self.shape(t))

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
    """ε grows linearly over the ramp: shape(t) = t."""

    def shape(self, t: float) -> float:
        return t


@dataclass(frozen=True)
class SmoothedSchedule(EpsSchedule):
    """ε(t) = a·t^p up to ``mid`` of the ramp, then linear to ε_target with the same slope at
    the joint (continuous first derivative); the shape of auto_LiRPA's ``SmoothedScheduler``
    (Xu et al. 2020), p = ``exponent``."""

    mid: float = 0.25
    exponent: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mid < 1 or self.exponent < 1:
            raise ValueError("schedule.mid must be in (0, 1) and schedule.exponent >= 1")

    def shape(self, t: float) -> float:
        p, m = self.exponent, self.mid
        # a·m^p + a·p·m^(p-1)·(1-m) = 1 (C¹ joint at m, reaching 1 at t=1)
        a = 1.0 / (m ** (p - 1) * (m + p * (1 - m)))
        if t < m:
            return a * t ** p
        return a * m ** p + a * p * m ** (p - 1) * (t - m)


def linear_coefficient(start: float, end: float, ratio: float) -> float:
    """start + (end - start)·ratio, with ratio = ε/ε_target clipped to [0, 1].

    Used for κ (κ_start → κ_end over the ramp, Zhang et al. 2020 Sec. 4) and β (1 → 0).
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
