"""Linear bounds of the margins with their coefficients (the A matrices), and the unrelaxed
network's ReLU inputs at given points: what the relaxation regularisers of Zhu et al. 2020 read
(:mod:`fastcert.relaxation`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastcert.bounds.choices import Bound, ReluBounds
from fastcert.bounds.lirpa import auto_lirpa

if TYPE_CHECKING:
    from auto_LiRPA import BoundedModule
    from auto_LiRPA.operators import BoundRelu


@dataclass
class LinearMarginBound:
    """A CROWN-style lower bound of the margins with its linear coefficients (the A matrices):

        m̲_t = Σ lA_t · z* + lbias_t,   z* = argmin over the input box of lA_t · z,

    ``input_coef`` is lA w.r.t. the input, c_tᵀ𝒲_{L:1} of Eq. 7 of Zhu et al. 2020 (the
    relaxed network's linear map from input to margin t); ``relu_coef`` holds, per ReLU in
    forward order, lA w.r.t. that ReLU's *input* (auto_LiRPA records the coefficient after
    propagating through the node: the ReLU output's coefficient λ times the chosen slope).
    ``relus`` are the intermediate bounds the relaxation was built from. The coefficients are
    detached (auto_LiRPA returns them so); ``lower`` and the bounds carry gradients."""

    lower: torch.Tensor            # (B, T)
    input_coef: torch.Tensor       # (B, T, *input shape)
    relu_coef: list[torch.Tensor]  # (B, T, *ReLU shape) each
    relus: list[ReluBounds]


def relu_nodes(module: BoundedModule) -> list[BoundRelu]:
    """The ReLU nodes of ``module`` in forward order."""
    return [n for n in module.modules() if isinstance(n, auto_lirpa().BoundRelu)]


def linear_margin_bound(module: BoundedModule, C: torch.Tensor, bound: Bound) -> LinearMarginBound:
    """The ``bound`` (CROWN or CROWN-IBP) lower bound of ``C @ logits`` and its A matrices,
    for the input of the forward pass just run (``module(BoundedTensor)``), in one
    ``compute_bounds(..., return_A=True, needed_A_dict=...)`` call."""
    if bound not in (Bound.CROWN, Bound.CROWN_IBP):
        raise ValueError(f"linear_margin_bound: {bound.key} has no single linear bound; "
                         f"use crown or crown_ibp")
    relus = relu_nodes(module)
    out, inp = module.output_name[0], module.input_name[0]
    lb, _, A = module.compute_bounds(x=None, C=C, method=bound.value, bound_upper=False,
                                     return_A=True,
                                     needed_A_dict={out: [inp] + [r.name for r in relus]})

    def coef(name):
        a = A[out][name]["lA"]
        if not isinstance(a, torch.Tensor):  # a Patches object (conv_mode "patches")
            raise RuntimeError(f"the A matrix of {name} came back as {type(a).__name__}; "
                               f"build the BoundedNet with bound_opts={{'conv_mode': 'matrix'}}")
        return a

    bounds = [ReluBounds(r.inputs[0].name, r.inputs[0].lower, r.inputs[0].upper)
              for r in relus]
    return LinearMarginBound(lb, coef(inp), [coef(r.name) for r in relus], bounds)


def _normalize(x, weight, bias, running_mean, running_var, *, mean, var, eps):
    """BatchNorm with given statistics (differentiable in them, unlike F.batch_norm's running
    statistics), ignoring the running ones."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape)
            + bias.view(shape))


def forward_relu_inputs(module: BoundedModule, z: torch.Tensor,
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The real (unrelaxed) network at inputs ``z``: its logits and every ReLU's input, in
    forward order. BatchNorm normalises with the statistics of the last forward pass (the ones
    the last bounds were computed with: in training mode the clean batch's) and leaves the
    running statistics alone, so the network is the one the bounds describe. The nodes keep
    their bounds (only forward values are replaced)."""
    frozen = [n for n in module.modules()
              if isinstance(n, auto_lirpa().BoundBatchNormalization)]
    for n in frozen:
        n.forward = functools.partial(_normalize, mean=n.current_mean, var=n.current_var,
                                      eps=n.eps)
    try:
        logits = module(z, clear_forward_only=True)
    finally:
        for n in frozen:
            del n.forward
    return logits, [r.inputs[0].forward_value for r in relu_nodes(module)]
