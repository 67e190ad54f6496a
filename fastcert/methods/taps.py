"""TAPS and STAPS: training-time adversarial propagation of sets (Mao et al., NeurIPS 2023)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastcert.attacks import PGDConfig
from fastcert.bounds import BoundedNet, margin_spec, robust_ce_from_margins
from fastcert.methods.base import Batch, Method, Ramp, StepOutput, mix
from fastcert.methods.ibp import fast_ibp_step
from fastcert.methods.sabr import SearchBN, check_lam, propagation_box, sabr_step
from fastcert.methods.warmup import Warmup


def head_start(model: nn.Module, head_blocks: int | None) -> int:
    """Index of the first top-level layer of a classifier head holding the last
    ``head_blocks`` ReLU blocks of an ``nn.Sequential`` (a block ends at a top-level ReLU or
    is a top-level module containing ReLUs, e.g. a residual block) and the output layer.

    ``head_blocks=1`` is the last hidden block and the output layer (CTBench/TAPS
    ``--block-sizes 17 4`` on CNN-7); 2 starts at CNN-7's fifth convolution (``13 8``), 3 at
    its fourth (``10 11``), 5 after its first (``4 17``). ``None`` (the default): 1, or 0 (the
    output layer alone) in a network with a single hidden block, so that the default exists
    in every model."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"TAPS splits an nn.Sequential model; got {type(model).__name__}")
    ends = [i for i, m in enumerate(model)
            if isinstance(m, nn.ReLU) or any(isinstance(c, nn.ReLU) for c in m.modules())]
    if head_blocks is None:
        head_blocks = min(1, len(ends) - 1)
    if not 0 <= head_blocks < len(ends):
        raise ValueError(f"method.head_blocks={head_blocks}: this model has {len(ends)} ReLU "
                         f"blocks; choose 0..{len(ends) - 1} (the feature extractor keeps at "
                         f"least one)")
    return ends[len(ends) - 1 - head_blocks] + 1


class _GradientLink(torch.autograd.Function):
    """TAPS's gradient connector (Mao et al. 2023; ``RectifiedLinearGradientLink`` in
    their code). Forward: the pivots P (B, K-1, ``*latent``), detached. Backward: no gradient to
    P; the gradient g of each pivot coordinate goes to the box bound it lies near, linearly
    in its distance: with w = u - l and threshold c::

        ∂/∂u += g·(p - (u - c·w))/(c·w)  where p ≥ u - c·w,
        ∂/∂l += g·((l + c·w) - p)/(c·w)  where p ≤ l + c·w,

    summed over the K-1 pivots of an example (factors floored at tol/2, c·w at tol).

    Computed as Σ_j g·[d_j ≥ 0]·max(d_j, tol/2), divided by the floored c·w after the sum (it
    is the same for every pivot), with d = p - (u - c·w) or (l + c·w) - p and the mask written
    as floats by the comparison itself: five passes over the pivots per bound and the sum,
    where a bool mask (slow to multiply on a CPU) and a division per pivot took six and the
    sum."""

    TOL = 1e-5

    @staticmethod
    def forward(ctx, pivots, lower, upper, c: float):
        ctx.save_for_backward(pivots, lower, upper)
        ctx.c = c
        return pivots.clone()

    @staticmethod
    def backward(ctx, grad):
        pivots, lower, upper = ctx.saved_tensors
        span = ctx.c * (upper - lower)
        reach = span.clamp_min(_GradientLink.TOL)

        def weighted(d):  # Σ_j g·[d ≥ 0]·max(d, tol/2) / reach; d is a temporary
            mask = torch.ge(d, 0, out=torch.empty_like(d))
            return d.clamp_min_(_GradientLink.TOL / 2).mul_(mask).mul_(grad).sum(1).div_(reach)

        to_up = weighted(pivots - (upper - span).unsqueeze(1))
        to_lo = weighted((lower + span).unsqueeze(1) - pivots)
        return None, to_lo, to_up, None


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient × w backward (TAPS's ``GradExpander``)."""

    @staticmethod
    def forward(ctx, x, w: float):
        ctx.w = w
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.w, None


class _PivotMargins(nn.Module):
    """Pivot j of example b (rows b·(K-1)+j) ↦ logits [0, f_{i_j} - f_y]: with label 0, PGD's
    margin objective is the estimate z_{i_j} - z_y of pivot j alone."""

    def __init__(self, head: nn.Module, spec: torch.Tensor):
        super().__init__()
        self.head = head
        self.rows = spec.reshape(-1, spec.shape[-1])  # (B·(K-1), K), row = e_y - e_{i_j}

    def forward(self, pivots):
        margin = (self.rows * self.head(pivots)).sum(1)
        return torch.stack([torch.zeros_like(margin), -margin], 1)


@dataclass
class TAPS(Method):
    """TAPS (Mao et al., NeurIPS 2023): IBP through a feature extractor g, PGD through the
    classifier head h. With [l, u] the IBP box of g over the input box, one PGD per class
    j ≠ y finds a pivot p_j ∈ [l, u] maximising h(p_j)_j - h(p_j)_y; the TAPS bound is
    est_j = h(p_j)_j - h(p_j)_y and, as the code of Mao et al. and CTBench's
    ``TAPSModelWrapper`` compute it::

        L_TAPS = CE([0, est], 0) = log(1 + Σ_j exp(est_j)),   L_IBP = CE(-m̲_IBP, y),
        L_rob  = GradScale(L_TAPS, w) · L_IBP

    The value is the product, the gradient w·L_IBP·∇L_TAPS + L_TAPS·∇L_IBP. The pivots reach
    [l, u] through the gradient connector (:class:`_GradientLink`, threshold
    ``soft_threshold``). L = κ·CE(f(x), y) + (1-κ)·L_rob
    + λ(L_tightness + L_relu): it holds the natural-CE weight ``kappa`` (:class:`Ramp`) and the
    warmup regularisers of Shi et al. 2021 (``warmup``, :class:`Warmup`) on the bounds of the
    box it propagates, as TAPS's code and CTBench do.

    ``head_blocks``: ReLU blocks in the head (:func:`head_start`; 1 = last hidden block +
    output layer; null, the default: 1, or the output layer alone where a network has one
    hidden block). ``latent_attack``: the pivot PGD (margin objective, random start in
    [l, u]; each pivot is the best of its start and iterates, the box centre no candidate, as
    in Mao et al.'s code); TAPS steps ``max(0.2, 2/T)·(u - l)``, i.e. 2·max(0.2, 2/T) of the
    half-width (0.4 for T = 10); CTBench's step decay (×0.2 from step int(0.7T) for
    10 ≤ T ≤ 50) is its ``step_decay``/``decay_at`` (the ctbench presets set them).
    BatchNorm: clean-batch statistics for the bounds, the search and the estimate.
    ``ibp_during_ramp``: fast IBP (:func:`fast_ibp_step`) while ε < ε_target, as both TAPS's
    and CTBench's code do. ``verified`` is IBP's on the ε-box (sound; none for STAPS's small
    box); ``acc/taps`` is the accuracy of the (unsound) TAPS estimate.
    """

    head_blocks: int | None = None
    grad_scale: float = 5.0
    soft_threshold: float = 0.5
    latent_attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=10, restarts=1, step_size=0.4, loss="margin", random_start=True))
    ibp_during_ramp: bool = True
    kappa: Ramp = field(default_factory=Ramp)
    warmup: Warmup = field(default_factory=Warmup)

    def __post_init__(self):
        if self.head_blocks is not None and self.head_blocks < 0:
            raise ValueError(f"head_blocks={self.head_blocks}: must be >= 0")
        if self.grad_scale < 0 or not 0 < self.soft_threshold <= 1:
            raise ValueError("grad_scale must be >= 0 and soft_threshold in (0, 1]")

    def step(self, net, batch):
        if batch.eps <= 0 or (self.ibp_during_ramp and batch.ratio < 1):
            return self.ramp_step(net, batch)
        return self.taps_step(net, batch, *self.taps_box(net, batch))

    def ramp_step(self, net, batch: Batch) -> StepOutput:
        """The step at ε = 0 and, with ``ibp_during_ramp``, during the ramp: fast IBP."""
        return fast_ibp_step(net, batch, self.kappa, self.warmup)

    def taps_box(self, net, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The input box TAPS propagates: the ε-box."""
        return batch.lower, batch.upper

    def taps_step(self, net: BoundedNet, batch: Batch, lower: torch.Tensor,
                  upper: torch.Tensor) -> StepOutput:
        view = net.split(head_start(net.model, self.head_blocks))
        latent, lo, up = view.latent_box(batch.x, lower, upper)
        logits, lb = view.head_margin_bounds(latent, batch.y, lo, up)
        est = self.estimate(net, view, batch.y, lo, up)
        taps = robust_ce_from_margins(-est)
        ibp = robust_ce_from_margins(lb)
        robust = _GradScale.apply(taps, self.grad_scale) * ibp
        natural = torch.nn.functional.cross_entropy(logits, batch.y)
        kappa = self.kappa.at(batch)
        loss = mix(natural, robust, kappa)
        loss, relus, diagnostics = self.warmup.add(loss, view.relu_bounds, upper - lower, batch)
        stats = {"loss/natural": natural.detach(), "loss/robust": robust.detach(),
                 "loss/taps": taps.detach(), "loss/ibp": ibp.detach(),
                 "acc/taps": ((est < 0).all(1) & (logits.argmax(1) == batch.y)).float().mean(),
                 "kappa": kappa, "lambda": self.warmup.weight(batch)}
        # IBP of the ε-box certifies; of STAPS's small box it does not
        verified = (lb > 0).all(1).detach() if lower is batch.lower else None
        return StepOutput(loss, logits.detach(), stats, verified, relus, diagnostics)

    def estimate(self, net: BoundedNet, view, y: torch.Tensor, lo: torch.Tensor,
                 up: torch.Tensor) -> torch.Tensor:
        """est (B, K-1): the head's h_j - h_y at the PGD pivot of each class j ≠ y, found in
        [lo, up] with the head's clean-batch BatchNorm statistics; differentiable in the head
        and (through the gradient connector) in [lo, up]."""
        b, k = y.shape[0], net.num_classes
        spec = margin_spec(y, k)
        shape = lo.shape[1:]
        lo_rep = lo.detach().unsqueeze(1).expand(b, k - 1, *shape).reshape(-1, *shape)
        up_rep = up.detach().unsqueeze(1).expand(b, k - 1, *shape).reshape(-1, *shape)
        target = torch.zeros(b * (k - 1), dtype=torch.long, device=y.device)
        # the search's x is no candidate: from a random start only its shape is read, else
        # it is the first iterate, the box centre
        start = lo_rep if self.latent_attack.random_start else (lo_rep + up_rep) / 2
        with net.batch_norm_stats(view.head, detach=True):
            pivots = self.latent_attack.run(_PivotMargins(view.head_module, spec), start,
                                            target, lo_rep, up_rep, evaluate_x=False).x_adv
        pivots = _GradientLink.apply(pivots.detach().view(b, k - 1, *shape), lo, up,
                                     self.soft_threshold)
        with net.batch_norm_stats(view.head):
            out = view.head_module(pivots.reshape(-1, *shape)).view(b, k - 1, k)
        return -(spec * out).sum(-1)  # row j: -(h_y - h_{i_j}) at pivot j


@dataclass
class STAPS(TAPS):
    """STAPS (Mao et al., NeurIPS 2023; CTBench ``STAPSModelWrapper``): TAPS on SABR's small box
    — the input box is :func:`fastcert.methods.sabr.propagation_box` (PGD centre, radius λ·ε,
    ``lam``) instead of the ε-box; during the ramp (``ibp_during_ramp``) it trains as SABR
    (:func:`fastcert.methods.sabr.sabr_step`). ``attack`` is the input-space search (TAPS's
    code: 10 steps of 0.2 of the half-width, 1 restart, CE), with BatchNorm in eval mode or
    the clean batch's statistics (``search_bn``, as SABR's)."""

    lam: float = 0.4
    attack: PGDConfig = field(default_factory=lambda: PGDConfig(
        steps=10, restarts=1, step_size=0.2, loss="ce", random_start=True))
    search_bn: SearchBN = "eval"

    def __post_init__(self):
        super().__post_init__()
        check_lam(self.lam)

    def ramp_step(self, net, batch):
        return sabr_step(net, batch, self.lam, self.attack, self.kappa, self.warmup,
                         self.search_bn)

    def taps_box(self, net, batch):
        return propagation_box(net, batch, self.lam, self.attack, self.search_bn)
