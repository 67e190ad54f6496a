"""Everything fastcert asks of auto_LiRPA, in one place.

A :class:`BoundedNet` is *one network state* seen three ways: the plain ``nn.Module``, its
``BoundedModule`` over the classification margins, and (when a method asks for it) the
loss-fusion ``BoundedModule`` of Xu et al. 2020 (``CrossEntropyWrapper``). auto_LiRPA shares
the parameters with the wrapped module but keeps *copies* of BatchNorm running statistics;
:func:`~fastcert.bounds.net._tie_buffers` makes all three views use the same buffer tensors,
so a metric measured through any view sees the same BN statistics (with copies, a model trained
through the BoundedModule and measured through the plain module can show verified > clean
accuracy).

The modules: ``lirpa`` (:func:`auto_lirpa`, the one way into auto_LiRPA), ``choices`` (the
bound methods, the margin specification, the robust loss), ``net`` (:class:`BoundedNet`,
:class:`SplitNet`), ``linear`` (linear margin bounds and their coefficients).
"""
from fastcert.bounds.choices import (
    Bound,
    BoundChoice,
    Mix,
    ReluBounds,
    beta_mix,
    compute_bounds,
    margin_spec,
    relu_bounds_of,
    robust_ce_from_margins,
)
from fastcert.bounds.linear import (
    LinearMarginBound,
    forward_relu_inputs,
    linear_margin_bound,
    relu_nodes,
)
from fastcert.bounds.lirpa import auto_lirpa
from fastcert.bounds.net import RELAXATIONS, BoundedNet, SplitNet

__all__ = ["auto_lirpa", "Bound", "BoundChoice", "Mix", "ReluBounds", "beta_mix",
           "compute_bounds", "margin_spec", "relu_bounds_of", "robust_ce_from_margins",
           "BoundedNet", "SplitNet", "RELAXATIONS", "LinearMarginBound", "linear_margin_bound",
           "relu_nodes", "forward_relu_inputs"]
