"""Warmup regularisers of Shi et al. 2021 (Sec. 3.3.3) and the ReLU-state statistics.

Both read the interval bounds of every ReLU's input that the robust loss already computed
(:meth:`fastcert.bounds.BoundedNet.relu_bounds`): no second bound pass. All expectations Ê(·)
are means over the batch and the layer's neurons.

Both terms are functions of six sums per layer (:func:`layer_sums`), which one autograd
function computes with its gradient in closed form: the bounds are the largest tensors of a
step, and autograd through the formulas as written made 8 passes over a layer's bounds in
the forward pass (two of them bool-to-float conversions, slow on a CPU) and 18 in the
backward pass, where this makes 5 and 8.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastcert.bounds import ReluBounds


class LayerSums(NamedTuple):
    """One ReLU layer's bounds [h̲, h̄] reduced to what Eqs. 7-8 read. With c = (h̲ + h̄)/2, its
    mean μ over the layer and batch, the active set A = {h̲ > 0} and the inactive set
    I = {h̄ < 0}: ``sums`` = (Σh̲, Σh̄, Σ_A (c-μ), Σ_I (c-μ), Σ_A (c-μ)², Σ_I (c-μ)²)
    (differentiable), ``sizes`` = (|A|, |I|) (floats), and ``n`` the number of values."""

    sums: torch.Tensor
    sizes: torch.Tensor
    n: int

    @property
    def mean_width(self) -> torch.Tensor:
        """Ê(Δ_i) = Ê(h̄) - Ê(h̲)."""
        return (self.sums[1] - self.sums[0]) / self.n

    @property
    def mean_centre(self) -> torch.Tensor:
        """μ = Ê(c)."""
        return (self.sums[0] + self.sums[1]) / (2 * self.n)


class _Sums(torch.autograd.Function):
    """(h̲, h̄) → the sums and set sizes of :class:`LayerSums`, the gradient in closed form.
    For upstream gradients g_0..g_5 of the six sums and d = c - μ:

        ∂L/∂c_j = [j∈A](g_2 + 2 g_4 d_j) + [j∈I](g_3 + 2 g_5 d_j)
                  - (g_2 |A| + g_3 |I| + 2 g_4 Σ_A d + 2 g_5 Σ_I d)/n

    (the last term through μ), ∂L/∂h̲_j = ∂L/∂c_j / 2 + g_0 and ∂L/∂h̄_j = ∂L/∂c_j / 2 + g_1."""

    @staticmethod
    def forward(ctx, lower, upper):
        ctx.shape = lower.shape
        lower, upper = lower.reshape(-1), upper.reshape(-1)
        s_lower, s_upper = lower.sum(), upper.sum()
        d = torch.lerp(lower, upper, 0.5).sub_((s_lower + s_upper) / (2 * lower.numel()))
        # 0/1 masks written as floats by the comparison itself, one pass each (a bool mask,
        # then converted or multiplied, costs several float passes on a CPU)
        active = torch.gt(lower, 0, out=torch.empty_like(lower))      # [h̲ > 0]
        inactive = torch.lt(upper, 0, out=torch.empty_like(upper))    # [h̄ < 0]
        square = d * d
        sums = torch.stack([s_lower, s_upper, torch.dot(d, active), torch.dot(d, inactive),
                            torch.dot(square, active), torch.dot(square, inactive)])
        sizes = torch.stack([active.sum(), inactive.sum()])
        ctx.save_for_backward(d, active, inactive, sums, sizes)
        ctx.mark_non_differentiable(sizes)
        return sums, sizes

    @staticmethod
    def backward(ctx, g, _):
        d, active, inactive, sums, sizes = ctx.saved_tensors
        g0, g1, g2, g3, g4, g5 = g.unbind()
        through_mean = -(g2 * sizes[0] + g3 * sizes[1] + 2 * g4 * sums[2]
                         + 2 * g5 * sums[3]) / d.numel()
        # ∂L/∂h̲ = [A]·(g_2/2 + g_4 d) + [I]·(g_3/2 + g_5 d) + g_0 + through_mean/2
        grad_lower = (d * g4).add_(0.5 * g2).mul_(active)
        grad_lower.addcmul_((d * g5).add_(0.5 * g3), inactive)
        grad_lower.add_(g0 + 0.5 * through_mean)
        grad_upper = grad_lower + (g1 - g0)
        return grad_lower.view(ctx.shape), grad_upper.view(ctx.shape)


def layer_sums(relus: list[ReluBounds]) -> list[LayerSums]:
    """:class:`LayerSums` of every layer."""
    out = []
    for r in relus:
        sums, sizes = _Sums.apply(r.lower, r.upper)
        out.append(LayerSums(sums, sizes, r.lower.numel()))
    return out


def tightness_loss(input_width: torch.Tensor, layers: list[LayerSums], tau: float
                   ) -> torch.Tensor:
    """L_tightness = 1/(τ m) Σ_i ReLU(τ - Ê(Δ_0)/Ê(Δ_i))   (Eq. 7 of Shi et al. 2021).

    ``input_width`` is Δ_0 = x_U - x_L of the (clipped) input box; Δ_i = h̄_i - h̲_i for the
    m ReLU layers (Ê(Δ_i) floored at 1e-12, as the released code does). Penalises layers whose
    mean bound width exceeds Ê(Δ_0)/τ. As in the released code, the formula holds for every
    box: an empty one (Δ_0 = 0) gives the constant 1 (each term is τ), without gradient. At
    ε = 0 the methods holding the regularisers therefore compute the bounds on a tiny box
    (``method.warmup.min_eps_reg``, :class:`fastcert.methods.Warmup`; the released code's
    ``--min-eps-reg`` 1e-6), where the ratios are those of any small ε.
    """
    if not layers:
        return input_width.new_zeros(())
    delta0 = input_width.mean()
    terms = [torch.relu(tau - delta0 / s.mean_width.clamp_min(1e-12)) for s in layers]
    return torch.stack(terms).sum() / (tau * len(layers))


def _balance_ratios(s: LayerSums):
    """α_i and β_i of Sec. 3.3.3: contribution of active vs inactive neurons to Ê(c) and Var(c),

        α = Σ_A c / -Σ_I c,   β = Σ_A (c-μ)² / Σ_I (c-μ)²   (each side floored at 1e-12),

    and whether the layer has both an active and an inactive neuron (else the regulariser is
    not applied). Σ_A c = Σ_A (c-μ) + μ|A|. All three are tensors: nothing is read on the
    host."""
    mu = s.mean_centre
    active_c = s.sums[2] + mu * s.sizes[0]
    inactive_c = s.sums[3] + mu * s.sizes[1]
    alpha = active_c.clamp_min(1e-12) / (-inactive_c).clamp_min(1e-12)
    beta = s.sums[4].clamp_min(1e-12) / s.sums[5].clamp_min(1e-12)
    return alpha, beta, (s.sizes > 0).all()


def relu_loss(layers: list[LayerSums], tau: float) -> torch.Tensor:
    """L_relu = 1/(τ m) Σ_i [ReLU(τ - min(α_i, 1/α_i)) + ReLU(τ - min(β_i, 1/β_i))]  (Eq. 8).

    Layers without both an active and an inactive neuron contribute 0 (as the paper states).
    """
    if not layers:
        return torch.zeros(())
    terms = []
    for s in layers:
        alpha, beta, both = _balance_ratios(s)
        term = sum(torch.relu(tau - torch.minimum(q, 1 / q)) for q in (alpha, beta))
        terms.append(torch.where(both, term, torch.zeros_like(term)))
    return torch.stack(terms).sum() / (tau * len(layers))


def relu_states(relus: list[ReluBounds]) -> dict[str, list[float]]:
    """Fractions of active (h̲ ≥ 0), inactive (h̄ ≤ 0) and unstable neurons per ReLU layer.

    The quantities of Fig. 2 of Shi et al. 2021 (Sec. 3.2.2 definitions).
    """
    out: dict[str, list[float]] = {"active": [], "inactive": [], "unstable": []}
    for r in relus:
        n = r.lower.numel()
        inactive = r.upper <= 0
        active = (r.lower >= 0) & ~inactive  # an interval [0, 0] counts as inactive only
        out["active"].append(active.sum().item() / n)
        out["inactive"].append(inactive.sum().item() / n)
        out["unstable"].append((~active & ~inactive).sum().item() / n)
    return out
