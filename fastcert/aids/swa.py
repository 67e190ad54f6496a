"""Stochastic weight averaging (Izmailov et al. 2018) as CTBench runs it (``--use-swa``,
``Utility/SWA.py``): the config node :class:`SWA` and the running average :class:`Averager`."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from fastcert.aids.batchnorm import example_weighted_statistics


@dataclass(frozen=True)
class SWA:
    """``aids.swa``: from epoch ``start`` on (null: off), the weights are averaged every
    ``every`` optimiser steps; after the last epoch the average replaces them and BatchNorm's
    statistics are recomputed for it.

    CTBench (``--swa-start S``, ``--swa-freq 10``, torchcontrib's SWA in auto mode): after
    optimiser step t (counted from 1 over the run), snapshot when t > S·N and t mod 10 = 0
    (N steps per epoch); the average is the equal-weight running mean of the parameters
    (``torch.optim.swa_utils.AveragedModel``'s default, buffers not averaged), training goes
    on from the raw weights, and at the end the average is swapped in and BatchNorm is updated
    with one example-weighted pass over the training batches
    (:func:`fastcert.aids.batchnorm.example_weighted_statistics`). The learning rate is left
    to the run's schedule (``--swa-lr None``)."""

    start: int | None = None
    every: int = 10

    def __post_init__(self):
        if self.start is not None and self.start < 0:
            raise ValueError(f"aids.swa.start={self.start}: an epoch >= 0, or null (no SWA)")
        if self.every < 1:
            raise ValueError(f"aids.swa.every={self.every}: must be >= 1 (optimiser steps)")

    @property
    def on(self) -> bool:
        return self.start is not None


class Averager:
    """The running average of ``model``'s parameters (an ``AveragedModel``, built on first
    use) for :class:`SWA` ``cfg`` with ``steps_per_epoch`` optimiser steps an epoch."""

    def __init__(self, cfg: SWA, model: nn.Module, steps_per_epoch: int):
        self.cfg, self.model = cfg, model
        self.first = cfg.start * steps_per_epoch  # snapshots after steps t > first (1-based)
        self.average: AveragedModel | None = None

    def after_step(self, step: int) -> None:
        """After optimiser step ``step`` (0-based over the run)."""
        t = step + 1
        if t > self.first and t % self.cfg.every == 0:
            if self.average is None:
                self.average = AveragedModel(self.model)
            self.average.update_parameters(self.model)

    def swap_in(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        """The average copied into the model's parameters (in place: tied views stay tied),
        then its BatchNorm statistics recomputed over ``batches()``. Nothing happens when no
        snapshot was taken."""
        if self.average is None:
            return
        with torch.no_grad():
            for p, avg in zip(self.model.parameters(), self.average.module.parameters(),
                              strict=True):
                p.copy_(avg)
        example_weighted_statistics(self.model, batches())

    @property
    def n_averaged(self) -> int:
        return 0 if self.average is None else int(self.average.n_averaged)

    def state_dict(self) -> dict | None:
        return None if self.average is None else self.average.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.average = None
            return
        self.average = AveragedModel(self.model)
        self.average.load_state_dict(state)
