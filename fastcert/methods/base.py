"""What every training method sees and returns: a :class:`Batch` in, a :class:`StepOutput` out.

A method is a dataclass whose fields are the keys of its config node
(``conf/method/<name>.yaml``: ``_target_: fastcert.methods.<Class>``); the training loop knows
none by name. ``step`` turns one batch into a loss. Parts several methods share are nested
nodes the method holds, not base classes: the κ ramp (:class:`Ramp`, ``method.kappa``) and the
warmup regularisers (:class:`fastcert.methods.warmup.Warmup`, ``method.warmup``), each checking
its own values.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastcert.bounds import BoundedNet, ReluBounds
from fastcert.schedules import eps_ratio, linear_coefficient

#: (centre, radius in pixel units) -> the L∞ box clipped to the data range (``DataBundle.eps_box``)
BoxFn = Callable[[torch.Tensor, "float | torch.Tensor"], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class Batch:
    """One training batch and where it sits on the ε schedule."""

    x: torch.Tensor
    y: torch.Tensor
    lower: torch.Tensor  # L∞ box at the current ε, already clipped to the data range
    upper: torch.Tensor
    eps: float
    eps_target: float
    box: BoxFn | None = None   # boxes of other centres / radii (SABR's small box, attacks)
    diagnostics: bool = False  # compute plot-only values (regularisers, ReLU states) this step

    @property
    def ratio(self) -> float:
        return eps_ratio(self.eps, self.eps_target)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor                            # clean logits, detached
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)  # detached scalars
    verified: torch.Tensor | None = None            # per example, under the training bound
    relus: list[ReluBounds] | None = None           # ReLU-input bounds (diagnostic steps only)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # plot-only scalars


@dataclass
class Ramp:
    """A coefficient that follows the ε ramp: ``start`` at ε = 0, ``end`` from ε = ε_target on,

        c(ε) = start + (end - start)·min(ε/ε_target, 1)

    (:func:`fastcert.schedules.linear_coefficient`). ``method.kappa`` is the weight κ of natural
    CE in L = κ·L_natural + (1-κ)·L_robust (Eq. 4 and Sec. 4 of Zhang et al. 2020, whose best
    trade-off takes κ from 1 to 0; start = end = 0 is the pure robust loss)."""

    start: float = 0.0
    end: float = 0.0

    def at(self, batch: Batch) -> float:
        """The coefficient at this batch's point of the ramp."""
        return linear_coefficient(self.start, self.end, batch.ratio)


class Method:
    """Base of the training methods (each a dataclass; see the module docstring)."""

    def step(self, net: BoundedNet, batch: Batch) -> StepOutput:  # pragma: no cover
        raise NotImplementedError


def mix(natural: torch.Tensor, robust: torch.Tensor, kappa: float) -> torch.Tensor:
    """κ·L_natural + (1-κ)·L_robust (Eq. 4 of Zhang et al. 2020; κ=0 is pure robust)."""
    return kappa * natural + (1 - kappa) * robust if kappa > 0 else robust


def natural_step(net: BoundedNet, batch: Batch) -> StepOutput:
    """Cross entropy on clean inputs through the plain ``nn.Module`` (its BatchNorm buffers are
    the BoundedModule's, so both views stay one network state)."""
    logits = net.model(batch.x)
    loss = F.cross_entropy(logits, batch.y)
    return StepOutput(loss, logits.detach(), {"loss/natural": loss.detach()})
