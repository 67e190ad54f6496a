"""Optimisers with their step-wise LR decay, gradient clipping and accumulation; one dataclass
per ``conf/optim/<name>.yaml`` (``_target_: fastcert.optim.<Class>``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Optimizer:
    """LR × ``gamma`` at each of ``milestones`` (epochs), gradient-norm clipping at
    ``grad_clip``, and ``grad_acc_steps`` accumulation steps per optimiser step. ``l1``: the
    weight w of an L1 penalty w·Σ|W| over the weights of every ``nn.Linear`` and ``nn.Conv2d``
    (no biases, no BatchNorm), as in Kaulen et al.'s CTRAIN (``regularisers/l1.py``; searched
    in [1e-8, 1e-4]); 0: none (:meth:`add_l1_gradient`)."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.2
    grad_clip: float = 10.0
    grad_acc_steps: int = 1
    l1: float = 0.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: the learning rate must be > 0")
        if self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip}: must be > 0")
        if self.grad_acc_steps < 1:
            raise ValueError(f"optim.grad_acc_steps={self.grad_acc_steps}: must be >= 1")
        if self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError("optim.weight_decay must be >= 0 and optim.gamma in (0, 1]")
        if self.l1 < 0:
            raise ValueError(f"optim.l1={self.l1}: the L1 weight must be >= 0 (0: none)")

    def make(self, params) -> torch.optim.Optimizer:  # pragma: no cover - subclasses
        raise NotImplementedError

    def build(self, params):
        """(optimiser, LR scheduler stepped once per epoch)."""
        opt = self.make(params)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.milestones),
                                                     gamma=self.gamma)
        return opt, sched

    def l1_weights(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The weights the L1 penalty covers ([] when ``l1`` is 0)."""
        if not self.l1:
            return []
        return [m.weight for m in model.modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    @torch.no_grad()
    def add_l1_gradient(self, weights: list[torch.Tensor]) -> None:
        """Add the gradient of l1·Σ|W|, l1·sign(W) (the subgradient 0 at W = 0, as autograd's
        of ``abs``), to each weight's gradient: the same step as adding the penalty to the
        batch's loss, without a second pass through the weights' graph."""
        for w in weights:
            if w.grad is not None:
                w.grad.add_(torch.sign(w), alpha=self.l1)


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015); Shi et al. 2021: lr 5e-4, ×0.2 decays, clip 10."""

    def make(self, params):
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay; torch's default
    decay 0.01 is what Kaulen et al.'s CTRAIN searches with (``conf/optim/adamw.yaml``)."""

    def make(self, params):
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


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
