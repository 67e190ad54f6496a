"""CTBench's ReLU shrinking (``--relu-shrinkage``, ``AIDomains/zonotope.py::HybridZonotope.relu``):
a training heuristic on interval bounds, not a sound bound."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastcert.bounds import auto_lirpa


def shrunk_relu_box(lower: torch.Tensor, upper: torch.Tensor, factor: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval a ReLU outputs for the input interval [l, u] with shrinking ``factor`` s:
    the upper bound of every unstable input (l < 0 < u) is multiplied by s before the ReLU,

        [relu(l), relu(u')],   u' = s·u where l < 0 < u, else u,

    (CTBench multiplies by ``relu_shrinkage``, 0.8 in its CIFAR-10 2/255 SABR/TAPS/STAPS
    scripts). For s < 1 the result need not contain the true output range."""
    unstable = (lower < 0) & (upper > 0)
    return F.relu(lower), F.relu(torch.where(unstable, upper * factor, upper))


@contextlib.contextmanager
def relu_shrinking(factor: float | None) -> Iterator[None]:
    """Within it, every IBP pass through a ReLU of any auto_LiRPA BoundedModule uses
    :func:`shrunk_relu_box` (``factor`` None or 1: unchanged). The training loop enters it
    around the method's step only: certification, evaluation, model selection and the
    soundness checks run outside it and never see shrunk bounds. The bounds stored at each
    ReLU's input (which the warmup regularisers read) are those before shrinking, as in
    CTBench; CROWN's backward relaxations are unchanged (CTBench shrinks in the box domain
    only)."""
    if factor is None or factor == 1:
        yield
        return
    relu = auto_lirpa().BoundRelu
    original = relu.__dict__["interval_propagate"]

    def interval_propagate(self, *v):
        return shrunk_relu_box(v[0][0], v[0][1], factor)

    relu.interval_propagate = interval_propagate
    try:
        yield
    finally:
        relu.interval_propagate = original
