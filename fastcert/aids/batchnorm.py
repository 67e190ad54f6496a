"""BatchNorm statistics recomputed over the training set: CTBench's precise BatchNorm after each
epoch and the BatchNorm update that ends SWA."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def precise_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """CTBench's ``--use-pop-bn-stats`` (``utils.py::reset_bn_to_population_statistics``): one
    pass over ``batches`` (the augmented training batches) in training mode without gradient,
    BatchNorm momentum 1/k at batch k, so every running mean / variance becomes the
    equal-weight average over the pass's batches of the batch mean and of the batch's
    *unbiased* variance, μ = (1/K)Σ_k μ_k, σ² = (1/K)Σ_k s²_k (the first batch discards the old
    statistics). This is PyTorch's cumulative average, which
    ``torch.optim.swa_utils.update_bn`` computes: it is called here."""
    update_bn(batches, model)


@torch.no_grad()
def example_weighted_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """The BatchNorm update that ends CTBench's SWA (``Utility/SWA.py::bn_update``): running
    statistics reset, then one pass over ``batches`` in training mode with momentum b/(n+b)
    for a batch of b examples after n, so they become the example-weighted averages
    μ = Σ_k b_k μ_k / Σ_k b_k and σ² = Σ_k b_k s²_k / Σ_k b_k of the batch means and unbiased
    batch variances (unlike :func:`precise_statistics`, a smaller last batch counts less).
    Momenta and the training mode are restored."""
    norms = batch_norms(model)
    if not norms:
        return
    momenta = {bn: bn.momentum for bn in norms}
    was_training = model.training
    model.train()
    for bn in norms:
        bn.reset_running_stats()
    seen = 0
    try:
        for x in batches:
            b = x.shape[0]
            for bn in norms:
                bn.momentum = b / (seen + b)
            model(x)
            seen += b
    finally:
        for bn, m in momenta.items():
            bn.momentum = m
        model.train(was_training)
