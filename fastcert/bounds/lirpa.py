"""The one way into auto_LiRPA: :func:`auto_lirpa` applies fastcert's patches
(:mod:`fastcert.compat`), then imports it."""
from __future__ import annotations

import functools
from types import SimpleNamespace

from fastcert import compat


@functools.cache
def auto_lirpa() -> SimpleNamespace:
    """auto_LiRPA's classes that fastcert uses, imported after :func:`fastcert.compat.apply`
    (some of its patches must precede the first ``import auto_LiRPA``, e.g. NumPy 2's
    ``isin``). Every use of auto_LiRPA goes through here, or calls it before importing
    auto_LiRPA itself; the first call applies the patches."""
    compat.apply()
    from auto_LiRPA import BoundedModule, BoundedTensor, CrossEntropyWrapper
    from auto_LiRPA.operators import (
        BoundBatchNormalization,
        BoundExp,
        BoundGatherElements,
        BoundRelu,
    )
    from auto_LiRPA.operators.leaf import BoundBuffers
    from auto_LiRPA.perturbations import PerturbationLpNorm

    return SimpleNamespace(BoundedModule=BoundedModule, BoundedTensor=BoundedTensor,
                           CrossEntropyWrapper=CrossEntropyWrapper,
                           BoundBatchNormalization=BoundBatchNormalization, BoundExp=BoundExp,
                           BoundGatherElements=BoundGatherElements, BoundRelu=BoundRelu,
                           BoundBuffers=BoundBuffers, PerturbationLpNorm=PerturbationLpNorm)
