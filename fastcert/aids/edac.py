"""CTBench's EDAC pre-step (``--use-EDAC-step``, ``model_wrapper.py::_EDACMixin``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastcert.attacks import PGDConfig
from fastcert.bounds import BoundedNet
from fastcert.methods.adversarial import clean_stats_point


@dataclass(frozen=True)
class EDAC:
    """``aids.edac``: before each training step, one extra step of the training optimiser on

        L_AC = γ · (1/B) Σ_b std_k f(x_adv,b)_k,

    the unbiased standard deviation over the K classes of each example's logits at a PGD
    point x_adv of the current ε-box (``attack``: CE objective; CTBench's PGD training attack,
    T steps of max(0.25, 2/T) of the half-width with its restarts), averaged over the batch;
    ``gamma`` γ = 0 switches it off (CTBench ``--EDAC-step-size``: 0.3 on MNIST and CIFAR-10
    2/255, 0.1 on TinyImageNet).

    As in CTBench's ``PGDModelWrapper.compute_model_stat``: a clean pass in training mode sets
    the BatchNorm statistics (and updates the running ones), the attack and f(x_adv) use those
    statistics (kept in f(x_adv)'s graph), ``L_AC.backward()`` and ``optimizer.step()`` with
    the run's optimiser itself (its moments, step count and learning rate; no clipping), and
    the gradient is *not* zeroed afterwards: the training step that follows accumulates its
    own gradient onto γ·∇L_AC(θ) and clips and applies the sum. It runs at every ε, 0
    included (there x_adv = x)."""

    gamma: float = 0.0
    attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=10, restarts=3, step_size=0.25, loss="ce", random_start=True))

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"aids.edac.gamma={self.gamma}: must be >= 0 (0: off)")

    @property
    def on(self) -> bool:
        return self.gamma > 0

    def pre_step(self, net: BoundedNet, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """The pre-step on the batch ``x, y`` with its ε-box [lower, upper]; returns L_AC
        (detached)."""
        net(x)  # the clean pass: sets the BatchNorm statistics
        _, x_adv = clean_stats_point(net, x, y, lower, upper, self.attack)
        with net.batch_norm_stats():
            logits = net.model(x_adv)
        loss = self.gamma * logits.std(dim=1).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()
