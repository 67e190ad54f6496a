"""Training aids of CTBench (Mao et al., ICML 2025; eth-sri/CTBench ``mix_train.py``), each its
own config node under ``aids`` and each off by default, whatever the method:

``aids.l1``
    c·Σ|W| over convolution and linear weights added to the loss every step
    (:mod:`fastcert.aids.l1`; ``--L1-reg``).
``aids.precise_bn``
    after every epoch the BatchNorm running statistics are recomputed over the training
    batches (:func:`fastcert.aids.batchnorm.precise_statistics`; ``--use-pop-bn-stats``), so
    model selection, checkpoints and the final evaluation use them.
``aids.swa``
    stochastic weight averaging (:class:`fastcert.aids.swa.SWA`; ``--use-swa``).
``aids.relu_shrinkage``
    unstable ReLU upper bounds × s in the *training* bound only
    (:mod:`fastcert.aids.shrink`; ``--relu-shrinkage``).
``aids.edac``
    the EDAC pre-step (:class:`fastcert.aids.edac.EDAC`; ``--use-EDAC-step``).

The training loop calls :class:`AidsRun`'s hooks; it knows no aid's details and no method.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from fastcert.aids.batchnorm import precise_statistics
from fastcert.aids.edac import EDAC
from fastcert.aids.l1 import add_l1_gradient, l1_norm
from fastcert.aids.shrink import relu_shrinking, shrunk_relu_box
from fastcert.aids.swa import SWA, Averager


@dataclass(frozen=True)
class Aids:
    """The ``aids`` node: ``l1`` (coefficient c ≥ 0; 0 off), ``precise_bn`` (bool), ``swa``
    (:class:`SWA`), ``relu_shrinkage`` (s in (0, 1]; null off), ``edac`` (:class:`EDAC`)."""

    l1: float = 0.0
    precise_bn: bool = False
    swa: SWA = field(default_factory=SWA)
    relu_shrinkage: float | None = None
    edac: EDAC = field(default_factory=EDAC)

    def __post_init__(self):
        if self.l1 < 0:
            raise ValueError(f"aids.l1={self.l1}: the L1 coefficient must be >= 0 (0: off)")
        if self.relu_shrinkage is not None and not 0 < self.relu_shrinkage <= 1:
            raise ValueError(f"aids.relu_shrinkage={self.relu_shrinkage}: a factor in (0, 1] "
                             f"(CTBench: 0.8), or null (off)")

    def start(self, model: torch.nn.Module, steps_per_epoch: int, epochs: int) -> AidsRun:
        """The aids' state for a run of ``epochs`` epochs of ``steps_per_epoch`` steps."""
        return AidsRun(self, model, steps_per_epoch, epochs)


class AidsRun:
    """The hooks the training loop calls, in this order within a step: :meth:`pre_step`
    (after the gradients are zeroed), :meth:`shrinking` (around the method's step),
    :meth:`penalty` (after its backward, before clipping), :meth:`after_step` (after the
    optimiser step); after an epoch's last step :meth:`end_epoch`."""

    def __init__(self, cfg: Aids, model: torch.nn.Module, steps_per_epoch: int, epochs: int):
        self.cfg, self.model, self.epochs = cfg, model, epochs
        self.averager = Averager(cfg.swa, model, steps_per_epoch) if cfg.swa.on else None

    def pre_step(self, net, optimizer, x, y, box: Callable, eps: float) -> dict:
        """EDAC's pre-step (when on) on the batch ``x, y`` and its ε-box ``box(x, eps)``; its
        record values."""
        if not self.cfg.edac.on:
            return {}
        return {"loss/edac": self.cfg.edac.pre_step(net, optimizer, x, y, *box(x, eps))}

    def shrinking(self) -> contextlib.AbstractContextManager:
        return relu_shrinking(self.cfg.relu_shrinkage)

    def penalty(self) -> dict:
        """The L1 penalty's gradient added to ``.grad`` (when on); its record values."""
        if self.cfg.l1 <= 0:
            return {}
        return {"loss/l1": add_l1_gradient(self.model, self.cfg.l1)}

    def after_step(self, step: int) -> None:
        if self.averager is not None:
            self.averager.after_step(step)

    def end_epoch(self, epoch: int, batches: Callable[[], Iterable[torch.Tensor]]) -> dict:
        """Precise BatchNorm (when on) and, after the last epoch, SWA's swap (when on), each
        over a fresh pass of ``batches()`` (the training batches); the epoch's record values."""
        record = {}
        if self.cfg.precise_bn:
            precise_statistics(self.model, batches())
        if self.averager is not None:
            record["swa_snapshots"] = self.averager.n_averaged
            if epoch + 1 == self.epochs:
                self.averager.swap_in(batches)
        return record

    def state_dict(self) -> dict:
        return {"swa": None if self.averager is None else self.averager.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if self.averager is not None:
            self.averager.load_state_dict((state or {}).get("swa"))


__all__ = ["Aids", "AidsRun", "EDAC", "SWA", "Averager", "l1_norm", "add_l1_gradient",
           "precise_statistics", "relu_shrinking", "shrunk_relu_box"]
