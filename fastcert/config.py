"""Typed views of the config groups that the core consumes, checked before any training.

Hydra already rejects unknown group options (``model=foo``) and unknown top-level keys; these
dataclasses reject unknown or mistyped keys *inside* a group and check values (ε range, schedule
lengths) so that a bad run fails in the first second, not after an hour.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from fastcert.attacks import PGDConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to do."""


@dataclass(frozen=True)
class OptimConfig:
    """Adam with step-wise LR decay ×gamma at ``milestones`` (epochs), gradient-norm clipping
    and gradient accumulation (Shi et al. 2021, Sec. 4 / App. C: lr 5e-4, decay ×0.2)."""

    name: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    grad_clip: float = 10.0
    grad_acc_steps: int = 1

    def __post_init__(self):
        if self.name != "adam":
            raise ConfigError(f"optim.name={self.name!r}: only 'adam' is implemented")
        if self.lr <= 0 or self.grad_clip <= 0 or self.grad_acc_steps < 1:
            raise ConfigError("optim.lr and optim.grad_clip must be > 0, optim.grad_acc_steps >= 1")


@dataclass(frozen=True)
class ScheduleConfig:
    """ε warmup "start+length+rest" (see :class:`fastcert.schedules.EpsSchedule`)."""

    kind: str = "linear"
    start: int = 0
    length: int = 0
    mid: float = 0.25
    exponent: float = 4.0


@dataclass(frozen=True)
class EvalConfig:
    """Final test evaluation: which verifiers, and the PGD attack."""

    verifiers: tuple[str, ...] = ("ibp", "crown")
    pgd: PGDConfig = field(default_factory=PGDConfig)


def typed(cls, values: Mapping[str, Any] | None, where: str):
    """Build dataclass ``cls`` from a config mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; "
                          f"allowed: {sorted(fields)}")
    for name, value in list(values.items()):
        if dataclasses.is_dataclass(fields[name].default_factory if fields[name].default_factory
                                    is not dataclasses.MISSING else None):
            values[name] = typed(fields[name].default_factory, value, f"{where}.{name}")
        elif isinstance(value, list):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def check_eps(eps: float, eps_max: float) -> None:
    """ε must lie in [0, eps_max], eps_max being the data range in pixel units."""
    if eps is None or eps < 0:
        raise ConfigError(f"eps={eps}: the perturbation radius must be >= 0 (pixel units)")
    if eps > eps_max:
        raise ConfigError(f"eps={eps} exceeds the data range [0, {eps_max}]: every input would "
                          f"be perturbable to every other; use eps <= {eps_max}")


def check_epochs(epochs: int, schedule: ScheduleConfig) -> None:
    if epochs < 1:
        raise ConfigError(f"epochs={epochs}: train for at least one epoch")
    warmup = schedule.start + schedule.length
    if epochs < warmup:
        warnings.warn(f"epochs={epochs} is shorter than the warmup ({schedule.start}+"
                      f"{schedule.length} epochs): eps_target is never reached during training",
                      stacklevel=2)
