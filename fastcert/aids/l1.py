"""CTBench's L1 penalty (``--L1-reg``, ``regularization.py::compute_L1_reg``): c·Σ|W| over the
weights of every convolution and linear layer, added to the training loss every step."""
from __future__ import annotations

import torch
import torch.nn as nn


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights the penalty sums over: those of every ``nn.Conv2d`` / ``nn.Linear`` (the
    output layer included) that train; no bias, no BatchNorm parameter."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(m.weight, nn.Parameter)
            and m.weight.requires_grad]


def l1_norm(model: nn.Module) -> torch.Tensor:
    """Σ|W| over :func:`penalized_weights` (a plain sum: no mean over parameters or examples)."""
    return sum(w.abs().sum() for w in penalized_weights(model))


def add_l1_gradient(model: nn.Module, coefficient: float) -> torch.Tensor:
    """Add the gradient of ``coefficient``·Σ|W|, ``coefficient``·sign(W) (autograd's
    subgradient: 0 at 0), to each penalised weight's ``.grad``, as CTBench's
    ``loss + L1_reg·compute_L1_reg(net)`` does before its backward pass (so the gradient
    clipping that follows includes it); returns the penalty's value (detached).

    Written into ``.grad`` rather than back-propagated so that it is added once per optimiser
    step whatever the accumulation chunks and outside a data-parallel wrapper's reduction:
    every rank adds the same term to the same reduced gradient."""
    with torch.no_grad():
        for w in penalized_weights(model):
            step = coefficient * w.sign()
            if w.grad is None:
                w.grad = step
            else:
                w.grad.add_(step)
        return coefficient * l1_norm(model)
