"""Standard training."""
from __future__ import annotations

from dataclasses import dataclass

from fastcert.methods.base import Method, natural_step


@dataclass
class Natural(Method):
    """Standard training: cross entropy on clean inputs (no certificate)."""

    def step(self, net, batch):
        return natural_step(net, batch)
