"""Training methods: each turns one batch into a loss. The training loop knows none by name.

A method is a dataclass registered under the name used by ``method=<name>``; its fields are
the keys of ``conf/method/<name>.yaml``. ``step`` receives the clean batch, the L∞ box for the
current ε and the schedule position, and returns a :class:`StepOutput`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from fastcert.bounds import BoundedNet, ReluBounds, robust_ce_from_margins
from fastcert.regularizers import relu_loss, tightness_loss
from fastcert.schedules import eps_ratio, linear_coefficient, regularizer_weight

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class Batch:
    """One training batch and where it sits on the ε schedule."""

    x: torch.Tensor
    y: torch.Tensor
    lower: torch.Tensor  # L∞ box at the current ε, already clipped to the data range
    upper: torch.Tensor
    eps: float
    eps_target: float

    @property
    def ratio(self) -> float:
        return eps_ratio(self.eps, self.eps_target)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor                       # clean logits, detached
    stats: dict[str, float] = field(default_factory=dict)
    verified: torch.Tensor | None = None       # per example, under the training bound
    relus: list[ReluBounds] | None = None      # ReLU-input bounds the step computed


class Method:
    name: ClassVar[str]

    def step(self, net: BoundedNet, batch: Batch) -> StepOutput:  # pragma: no cover
        raise NotImplementedError


def _mix(natural: torch.Tensor, robust: torch.Tensor, kappa: float) -> torch.Tensor:
    """κ·L_natural + (1-κ)·L_robust (Eq. 4 of Zhang et al. 2020; κ=0 is pure robust)."""
    return kappa * natural + (1 - kappa) * robust if kappa > 0 else robust


def _regularizer_values(batch: Batch, relus: list[ReluBounds], tau: float):
    width = batch.upper - batch.lower
    return tightness_loss(width, relus, tau), relu_loss(relus, tau)


@register_method("natural")
@dataclass
class Natural(Method):
    """Standard training: cross entropy on clean inputs (no certificate)."""

    def step(self, net, batch):
        logits = net(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss, logits.detach(), {"loss/natural": loss.item()})


@register_method("ibp")
@dataclass
class IBP(Method):
    """Vanilla IBP training (Gowal et al. 2018): robust CE on IBP margin bounds (Eq. 9 of
    Shi et al. 2021), optionally mixed with natural CE, κ going κ_start → κ_end over the ramp.

    At ε = 0 it is natural training (the bounds collapse to the clean output). The warmup
    regularisers are computed from the same bounds for the plots only (Figs. 3-4 of Shi et al.).
    """

    kappa_start: float = 0.0
    kappa_end: float = 0.0
    tau: float = 0.5  # tolerance τ of the regularisers (plot-only values for vanilla IBP)

    def step(self, net, batch):
        if batch.eps <= 0:
            return Natural().step(net, batch)
        return self._bounded_step(net, batch)

    def _lambda(self, batch: Batch) -> float | None:
        """Weight of the optimised regularisers; None: computed for the plots only."""
        return None

    def _bounded_step(self, net, batch):
        logits, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, "ibp")
        relus = net.relu_bounds()
        kappa = linear_coefficient(self.kappa_start, self.kappa_end, batch.ratio)
        natural = F.cross_entropy(logits, batch.y)
        robust = robust_ce_from_margins(lb)
        loss = _mix(natural, robust, kappa)
        lam = self._lambda(batch)
        with torch.set_grad_enabled(lam is not None and torch.is_grad_enabled()):
            tight, relu = _regularizer_values(batch, relus, self.tau)
        stats = {"loss/natural": natural.item(), "loss/robust": robust.item(), "kappa": kappa,
                 "reg/tightness": tight.item(), "reg/relu": relu.item()}
        if lam is not None:
            stats["lambda"] = lam
            if lam > 0:
                loss = loss + lam * self._regularizer(tight, relu)
        return StepOutput(loss, logits.detach(), stats, (lb > 0).all(1).detach(), relus)

    def _regularizer(self, tight: torch.Tensor, relu: torch.Tensor) -> torch.Tensor:
        return tight + relu


@register_method("fast")
@dataclass
class FastIBP(IBP):
    """IBP training with the warmup regularisers of Shi et al. 2021 (Sec. 3.3.3, Eq. 10):

        L = L_rob + λ(L_tightness + L_relu),  λ = λ0(1 - ε/ε_target) during warmup, 0 after.

    IBP initialisation and full BatchNorm are the model-side parts of the method
    (``init=ibp``, ``model.bn=full``; conf/method/fast.yaml selects the former). Bounds are
    computed even at ε = 0 so that L_relu acts from the first epoch (Table 3 of the paper
    reports this small overhead in the ε=0 phase). ``tightness``/``relu`` switch each
    regulariser on or off (the Table 4 ablation).
    """

    lambda0: float = 0.5
    tightness: bool = True
    relu: bool = True

    def step(self, net, batch):
        return self._bounded_step(net, batch)

    def _lambda(self, batch):
        return regularizer_weight(self.lambda0, batch.eps, batch.eps_target)

    def _regularizer(self, tight, relu):
        return (tight if self.tightness else 0.0) + (relu if self.relu else 0.0)


@register_method("crown_ibp")
@dataclass
class CrownIBP(Method):
    """CROWN-IBP (Zhang et al. 2020): margin bounds β·CROWN-IBP + (1-β)·IBP, β going
    β_start → β_end over the ramp, natural CE mixed in with κ_start → κ_end.

    ``loss_fusion=true`` bounds the CE directly (Xu et al. 2020; O(1) instead of O(K) backward
    passes): the form Shi et al. 2021 use as their baseline, where the IBP weight is ε/ε_target
    (i.e. β = 1 - ε/ε_target, the defaults). ``loss_fusion=false`` bounds the K-1 margins.
    """

    loss_fusion: bool = True
    beta_start: float = 1.0
    beta_end: float = 0.0
    kappa_start: float = 0.0
    kappa_end: float = 0.0

    def step(self, net, batch):
        if batch.eps <= 0:
            return Natural().step(net, batch)
        beta = linear_coefficient(self.beta_start, self.beta_end, batch.ratio)
        kappa = linear_coefficient(self.kappa_start, self.kappa_end, batch.ratio)
        if self.loss_fusion:
            natural, robust, logits = net.fused_ce(batch.x, batch.y, batch.lower, batch.upper,
                                                   beta=beta)
            natural, robust = natural.mean(), robust.mean()
            verified, relus = None, net.relu_bounds(fused=True)
        else:
            logits_t, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper,
                                             "crown_ibp", beta=beta)
            logits = logits_t.detach()
            natural = F.cross_entropy(logits_t, batch.y)
            robust = robust_ce_from_margins(lb)
            verified, relus = (lb > 0).all(1).detach(), net.relu_bounds()
        loss = _mix(natural, robust, kappa)
        stats = {"loss/natural": natural.item(), "loss/robust": robust.item(),
                 "kappa": kappa, "beta": beta}
        return StepOutput(loss, logits, stats, verified, relus)


def create_method(cfg: dict) -> Method:
    """Build a method from its config: ``{"name": ..., <dataclass fields>}``."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {sorted(unknown)}; "
                         f"its options are {sorted(known)}")
    return cls(**cfg)
