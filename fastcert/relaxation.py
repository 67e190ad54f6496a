"""How far a convex relaxation is from the network it relaxes: the indicators d and r of Zhu
et al. 2020 ("Improving the Tightness of Convex Relaxation Bounds for Training Certifiably
Robust Classifiers", arXiv 2002.09766; Secs. 3-4), computed from what auto_LiRPA already gives.

For a margin c_t = e_y - e_t, CROWN's lower bound p_C* (the optimum of the relaxed problem C,
Eq. 7) is attained at an input z* = x + δ0* and, at every unstable ReLU j of layer i, on one of
the two relaxation lines. Both are read from the bound's linear coefficients
(:class:`fastcert.bounds.LinearMarginBound`), no second bound propagation:

* δ0* = -ε·sign(c_tᵀ𝒲_{L:1}) (Sec. 4.2; -ε where the coefficient is ≥ 0, as Sec. 3.1 states):
  with the data's clipped box, the corner ``where(coef ≥ 0, lower, upper)``;
* δ*_ij ≠ 0 (the optimum on the upper line) iff the ReLU output's coefficient λ_ij < 0, i.e.
  iff the coefficient of the ReLU's input (λ_ij times a positive slope) is < 0.

One forward pass of the real network at z* (B·T inputs) gives p'_O = c_tᵀh_L(z*) and the
pre-activations x'_ij = h_i(z*), hence::

    d = p'_O - p_C*                                                        (Eq. 8)
    r = 1/Σ_i|I_i| · Σ_i [ Σ_{j∈I_i, δ*=0} |x'_ij| + Σ_{j∈I_i, δ*≠0} min(|x'_ij - x̲_ij|,
                                                                          |x'_ij - x̄_ij|) ]  (Eq. 9)

per example and target class t, I_i the unstable neurons (x̲ < 0 < x̄) of layer i (r = 0 when
there are none). d ≥ 0 since z* is feasible for the original problem (p'_O ≥ p_O* ≥ p_C*), and
r = 0 implies d = 0 (Proposition 1). The training objective is Eq. 10:
L_rob + λ Σ_t d_t + γ Σ_t r_t, averaged over the batch.

Eq. 9's |x'| is the distance to the only point where the same-slope band's lower line meets the
ReLU (x' = 0). For auto_LiRPA's default ``adaptive`` relaxation the lower line is z = 0 (slope
α = 0) or z = x (α = 1, when x̄ > -x̲), which meets the ReLU on all of [x̲, 0] or [0, x̄];
``r_form="generalised"`` measures the distance to that set instead (relu(x') or relu(-x')), so
an exact neuron costs nothing. Under ``same-slope`` both forms are Eq. 9.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastcert.bounds import (
    RELAXATIONS,
    Bound,
    BoundedNet,
    LinearMarginBound,
    forward_relu_inputs,
    linear_margin_bound,
    margin_spec,
)

RForm = Literal["literal", "generalised"]


@dataclass
class Indicators:
    """d and r (B, T) for every example and target class, and where they were measured."""

    d: torch.Tensor
    r: torch.Tensor
    optimum_input: torch.Tensor     # z* = x + δ0*, (B, T, *input shape)
    margin_at_optimum: torch.Tensor  # p'_O = c_tᵀ h_L(z*), (B, T)
    unstable: torch.Tensor          # Σ_i |I_i| per example, (B,)

    def loss(self, lam: float, gamma: float) -> torch.Tensor:
        """λ Σ_t d_t + γ Σ_t r_t averaged over the batch (the regularisers of Eq. 10)."""
        return lam * self.d.sum(1).mean() + gamma * self.r.sum(1).mean()


def optimum_input(input_coef: torch.Tensor, lower: torch.Tensor,
                  upper: torch.Tensor) -> torch.Tensor:
    """z* = x + δ0*: the corner of the box [lower, upper] minimising input_coef · z, per target
    class: ``lower`` where the coefficient is ≥ 0, ``upper`` where it is < 0 (Sec. 3.1 and 4.2
    of Zhu et al.; unclipped, lower = x - ε and this is x - ε·sign(coef))."""
    return torch.where(input_coef >= 0, lower.unsqueeze(1), upper.unsqueeze(1))


def on_upper_line(relu_coef: torch.Tensor) -> torch.Tensor:
    """δ*_ij ≠ 0: the relaxed optimum lies on the upper line (λ_ij < 0, Sec. 3.1)."""
    return relu_coef < 0


def _near_distance(pre: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, relu: str,
                   r_form: RForm) -> torch.Tensor:
    """Distance of x' to where the lower line meets the ReLU (see the module docstring)."""
    if r_form == "literal" or relu == "same-slope":
        return pre.abs()
    slope_one = upper > -lower  # auto_LiRPA's adaptive lower slope: 1 iff x̄/(x̄-x̲) > 1/2
    return torch.where(slope_one, torch.relu(-pre), torch.relu(pre))


def indicators(module, bound: LinearMarginBound, C: torch.Tensor, lower: torch.Tensor,
               upper: torch.Tensor, relu: str = "same-slope", r_form: RForm = "literal",
               ) -> Indicators:
    """d (Eq. 8) and r (Eq. 9) of Zhu et al. for the bound just computed by ``module`` (the
    BoundedModule with relaxation ``relu``) over the box [lower, upper], specification ``C``
    (B, T, K). One forward pass of B·T inputs; gradients reach d through p'_O and p_C*, and r
    through x' and the intermediate bounds (δ0*, δ* and the unstable sets are constants)."""
    if relu not in RELAXATIONS:
        raise ValueError(f"relu={relu!r}: choose one of {RELAXATIONS}")
    B, T = bound.lower.shape
    z = optimum_input(bound.input_coef, lower, upper)
    logits, pres = forward_relu_inputs(module, z.reshape(B * T, *z.shape[2:]))
    margin = (C * logits.view(B, T, -1)).sum(-1)
    total = margin.new_zeros(B, T)
    count = margin.new_zeros(B)
    for rb, coef, pre in zip(bound.relus, bound.relu_coef, pres):
        lo, up = rb.lower.unsqueeze(1), rb.upper.unsqueeze(1)
        pre = pre.view(B, T, *pre.shape[1:])
        unstable = (lo < 0) & (up > 0)
        far = torch.minimum((pre - lo).abs(), (pre - up).abs())
        near = _near_distance(pre, lo, up, relu, r_form)
        term = torch.where(on_upper_line(coef), far, near)
        total = total + torch.where(unstable, term, torch.zeros_like(term)).flatten(2).sum(-1)
        count = count + unstable[:, 0].flatten(1).sum(-1)
    r = total / count.clamp_min(1).unsqueeze(1)
    return Indicators(margin - bound.lower, r, z, margin, count)


def relaxed_margins(module, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                    upper: torch.Tensor, num_classes: int, bound: Bound,
                    ) -> tuple[torch.Tensor, torch.Tensor, LinearMarginBound]:
    """Clean logits, the specification C (B, K-1, K) and the ``bound`` (CROWN or CROWN-IBP)
    margin bound with its A matrices, through ``module`` (a clean forward pass first, as
    :meth:`fastcert.bounds.BoundedNet.margin_bounds`)."""
    C = margin_spec(y, num_classes)
    logits = module(BoundedNet.perturbed(x, lower, upper))
    return logits, C, linear_margin_bound(module, C, bound)


@torch.no_grad()
def measure(net: BoundedNet, loader, box_fn, eps: float, bound: Bound = Bound.CROWN_IBP,
            relu: str = "adaptive", r_form: RForm = "literal",
            device: torch.device | str = "cpu") -> dict[str, float]:
    """Means over ``loader`` (eval mode) of Σ_t d_t and Σ_t r_t at radius ``eps`` under
    ``bound`` with relaxation ``relu``: how tight the trained network's relaxation is."""
    net.eval()
    module = net.relaxed(relu)
    sums = {"d": 0.0, "r": 0.0, "unstable": 0.0}
    n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        lower, upper = box_fn(x, eps)
        _, C, lin = relaxed_margins(module, x, y, lower, upper, net.num_classes, bound)
        ind = indicators(module, lin, C, lower, upper, relu, r_form)
        sums["d"] += ind.d.sum().item()
        sums["r"] += ind.r.sum().item()
        sums["unstable"] += ind.unstable.sum().item()
        n += len(y)
    return {k: v / max(n, 1) for k, v in sums.items()}
