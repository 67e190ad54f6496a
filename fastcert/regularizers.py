"""Warmup regularisers of Shi et al. 2021 (Sec. 3.3.3) and the ReLU-state statistics.

Both read the interval bounds of every ReLU's input that the robust loss already computed
(:meth:`fastcert.bounds.BoundedNet.relu_bounds`): no second bound pass. All expectations Ê(·)
are means over the batch and the layer's neurons.
"""
from __future__ import annotations

import torch

from fastcert.bounds import ReluBounds


def tightness_loss(input_width: torch.Tensor, relus: list[ReluBounds], tau: float) -> torch.Tensor:
    """L_tightness = 1/(τ m) Σ_i ReLU(τ - Ê(Δ_0)/Ê(Δ_i))   (Eq. 7 of Shi et al. 2021).

    ``input_width`` is Δ_0 = x_U - x_L of the (clipped) input box; Δ_i = h̄_i - h̲_i for the
    m ReLU layers (Ê(Δ_i) floored at 1e-12, as the released code does). Penalises layers whose
    mean bound width exceeds Ê(Δ_0)/τ. As in the released code, the formula holds for every
    box: an empty one (Δ_0 = 0) gives the constant 1 (each term is τ), without gradient. At
    ε = 0 the methods holding the regularisers therefore compute the bounds on a tiny box
    (``method.warmup.min_eps_reg``, :class:`fastcert.methods.Warmup`; the released code's
    ``--min-eps-reg`` 1e-6), where the ratios are those of any small ε.
    """
    if not relus:
        return input_width.new_zeros(())
    delta0 = input_width.mean()
    # Ê(Δ_i) = Ê(h̄_i) - Ê(h̲_i): two reductions, no width tensor
    terms = [torch.relu(tau - delta0 / (r.upper.mean() - r.lower.mean()).clamp_min(1e-12))
             for r in relus]
    return torch.stack(terms).sum() / (tau * len(relus))


def _balance_ratios(lower: torch.Tensor, upper: torch.Tensor):
    """α_i and β_i of Sec. 3.3.3: contribution of active vs inactive neurons to Ê(c) and Var(c),
    and whether the layer has both an active and an inactive neuron (else the regulariser is
    not applied). c = (h̲ + h̄)/2; active neurons have h̲ > 0, inactive ones h̄ < 0. The masked
    sums are dot products with the 0/1 masks (one fused pass each, no masked temporaries). All
    three are tensors: nothing is read on the host."""
    lower, upper = lower.flatten(), upper.flatten()
    with torch.no_grad():
        active = (lower > 0).to(lower.dtype)
        inactive = (upper < 0).to(lower.dtype)
        both = (active.sum() > 0) & (inactive.sum() > 0)
    c = (lower + upper) * 0.5
    dev = c - c.mean()
    dev = dev * dev
    alpha = torch.dot(c, active).clamp_min(1e-12) / (-torch.dot(c, inactive)).clamp_min(1e-12)
    beta = torch.dot(dev, active).clamp_min(1e-12) / torch.dot(dev, inactive).clamp_min(1e-12)
    return alpha, beta, both


def relu_loss(relus: list[ReluBounds], tau: float) -> torch.Tensor:
    """L_relu = 1/(τ m) Σ_i [ReLU(τ - min(α_i, 1/α_i)) + ReLU(τ - min(β_i, 1/β_i))]  (Eq. 8).

    Layers without both an active and an inactive neuron contribute 0 (as the paper states).
    """
    if not relus:
        return torch.zeros(())
    terms = []
    for r in relus:
        alpha, beta, both = _balance_ratios(r.lower, r.upper)
        term = sum(torch.relu(tau - torch.minimum(q, 1 / q)) for q in (alpha, beta))
        terms.append(torch.where(both, term, torch.zeros_like(term)))
    return torch.stack(terms).sum() / (tau * len(relus))


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
