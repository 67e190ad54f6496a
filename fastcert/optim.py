"""Optimisers with their step-wise LR decay, gradient clipping and accumulation; one dataclass
per ``conf/optim/<name>.yaml`` (``_target_: fastcert.optim.<Class>``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class Optimizer:
    """LR × ``gamma`` at each of ``milestones`` (epochs), gradient-norm clipping at
    ``grad_clip``, and ``grad_acc_steps`` accumulation steps per optimiser step, whose chunks
    normalise with their own BatchNorm statistics (``grad_acc_bn: chunk``, Shi et al. 2021's
    code) or with those of one clean pass over the whole batch (``batch``, CTBench's
    ``GradAccuFunctionWrapper``: :func:`fastcert.whole_batch_bn.whole_batch_statistics`)."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.2
    grad_clip: float = 10.0
    grad_acc_steps: int = 1
    grad_acc_bn: Literal["chunk", "batch"] = "chunk"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: the learning rate must be > 0")
        if self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip}: must be > 0")
        if self.grad_acc_steps < 1:
            raise ValueError(f"optim.grad_acc_steps={self.grad_acc_steps}: must be >= 1")
        if self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError("optim.weight_decay must be >= 0 and optim.gamma in (0, 1]")

    def make(self, params) -> torch.optim.Optimizer:  # pragma: no cover - subclasses
        raise NotImplementedError

    def build(self, params):
        """(optimiser, LR scheduler stepped once per epoch)."""
        opt = self.make(params)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.milestones),
                                                     gamma=self.gamma)
        return opt, sched


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015); Shi et al. 2021: lr 5e-4, ×0.2 decays, clip 10. torch's fused
    implementation (one kernel over each parameter, the same update; on a CPU a quarter of
    the default's time for CNN-7's 17 M parameters)."""

    def make(self, params):
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)


@dataclass(frozen=True)
class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay; torch's default
    decay 0.01 is what Kaulen et al.'s CTRAIN searches with (``conf/optim/adamw.yaml``);
    torch's fused implementation, as :class:`Adam`."""

    def make(self, params):
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)


@dataclass(frozen=True)
class RAdam(Optimizer):
    """RAdam (Liu et al. 2020): Adam with a rectified adaptive learning rate."""

    def make(self, params):
        return torch.optim.RAdam(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class SGD(Optimizer):
    """SGD with momentum (plain SGD at momentum 0)."""

    momentum: float = 0.0

    def make(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)
