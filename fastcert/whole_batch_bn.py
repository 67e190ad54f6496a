"""Gradient accumulation with BatchNorm statistics of the whole batch (``optim.grad_acc_bn:
batch``), as CTBench's ``GradAccuFunctionWrapper`` (``model_wrapper.py``) runs it."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastcert.bounds import BoundedNet, auto_lirpa


@contextlib.contextmanager
def whole_batch_statistics(net: BoundedNet, x: torch.Tensor) -> Iterator[None]:
    """One clean pass over the whole batch ``x`` in training mode (BatchNorm's running
    statistics are updated once, by it); within the context every forward pass through any
    view of ``net`` — the margins, loss-fusion and split BoundedModules (their bounds included)
    and the plain module — normalises with that pass's batch statistics (mean and biased
    variance, kept in the graph: each chunk's gradient also flows through them, so a chunk's
    backward must retain the graph for the next) and updates no running statistic.

    CTBench: ``freeze_BN=False``, ``compute_nat_loss_and_set_BN`` on the whole batch, then
    ``freeze_BN=True`` for every chunk, ``loss_chunk.backward(retain_graph=True)``."""
    net(x)
    frozen = {}
    bn = auto_lirpa().BoundBatchNormalization
    for node in net.bounded.modules():
        if isinstance(node, bn) and node.training:
            frozen[id(node.inputs[3].buffer)] = (node.current_mean, node.current_var)
    original = bn.forward

    def forward(self, x, w, b, m, v):
        stats = frozen.get(id(self.inputs[3].buffer)) if self.training else None
        if stats is None:
            return original(self, x, w, b, m, v)
        self.current_mean, self.current_var = stats
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = w / torch.sqrt(stats[1] + self.eps)
        return (x - stats[0].view(shape)) * scale.view(shape) + b.view(shape)

    bn.forward = forward
    try:
        with net.batch_norm_stats():
            yield
    finally:
        bn.forward = original
