"""Test-set evaluation at one ε: clean, PGD and verified accuracy from one network state.

Every metric reads the same :class:`BoundedNet` in eval mode, and per example it is checked
that verified ⇒ PGD-robust ⇒ clean-correct; a violation raises :class:`SoundnessError` naming
the example (it would mean an unsound bound or a broken attack).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastcert.attacks import PGDConfig, pgd_attack
from fastcert.bounds import Bound, BoundedNet


@dataclass(frozen=True)
class EvalConfig:
    """The final test evaluation (``conf/eval/default.yaml``): the verifiers (keys of
    :class:`fastcert.bounds.Bound`: ibp, crown_ibp, crown, alpha_crown), the PGD attack, and
    the test radius ``eps`` in pixel units (null: the training radius; e.g. CROWN-IBP's MNIST
    setting trains at 0.4 and tests at 0.3, Zhang et al. 2020 Table 2)."""

    verifiers: list[str] = field(default_factory=lambda: ["ibp", "crown"])
    pgd: PGDConfig = field(default_factory=PGDConfig)
    eps: float | None = None

    def __post_init__(self):
        for v in self.verifiers:
            Bound.parse(v)
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"eval.eps={self.eps}: the test radius must be >= 0")

    @property
    def bounds(self) -> list[Bound]:
        return [Bound.parse(v) for v in self.verifiers]


class SoundnessError(AssertionError):
    """A certified example was broken by PGD, or a PGD-robust one is misclassified."""


@dataclass
class EvalResult:
    eps: float
    label: torch.Tensor
    pred: torch.Tensor
    pgd_robust: torch.Tensor
    verified: dict[str, torch.Tensor] = field(default_factory=dict)   # verifier -> bool (N,)
    margin_lb: dict[str, torch.Tensor] = field(default_factory=dict)  # verifier -> min_j m̲_j

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.pred == self.label

    @property
    def verified_any(self) -> torch.Tensor:
        out = torch.zeros_like(self.label, dtype=torch.bool)
        for v in self.verified.values():
            out |= v
        return out

    def summary(self) -> dict[str, float]:
        n = max(len(self.label), 1)
        out = {"clean_acc": self.clean_correct.sum().item() / n,
               "pgd_acc": self.pgd_robust.sum().item() / n}
        for name, v in self.verified.items():
            out[f"{name}_verified_acc"] = v.sum().item() / n
        if self.verified:
            out["any_verified_acc"] = self.verified_any.sum().item() / n
        return out

    def check_invariants(self) -> None:
        correct = self.clean_correct
        bad = torch.nonzero(self.pgd_robust & ~correct).flatten()
        if len(bad):
            raise SoundnessError(f"eps={self.eps}: test example {bad[0].item()} is PGD-robust "
                                 f"but misclassified clean (broken attack bookkeeping)")
        for name, v in self.verified.items():
            bad = torch.nonzero(v & ~self.pgd_robust).flatten()
            if len(bad):
                i = bad[0].item()
                raise SoundnessError(
                    f"eps={self.eps}: test example {i} is {name}-verified (margin lower bound "
                    f"{self.margin_lb[name][i].item():.3g}) but PGD found a misclassified "
                    f"input: the {name} bound is unsound")


def evaluate(net: BoundedNet, loader, box_fn, eps: float, verifiers=("ibp", "crown"),
             pgd: PGDConfig = PGDConfig(), device: torch.device | str = "cpu", seed: int = 0,
             progress=None) -> EvalResult:
    """Evaluate ``net`` on ``loader`` at radius ``eps``.

    ``box_fn(x, eps) -> (lower, upper)`` maps a pixel-space ε to the input box (see
    ``DataBundle.eps_box``). ``verifiers`` are :class:`fastcert.bounds.Bound` values or their
    keys (ibp, crown_ibp, crown, alpha_crown); results are keyed by those names. PGD's random
    starts of test batch b come from a generator seeded with (``seed``, b), b counted in the
    whole test set (``loader.first_batch`` is a shard's first): the same whether the test set
    is evaluated in one process or in blocks by several.
    """
    verifiers = [Bound.parse(v) for v in verifiers]
    net.eval()
    gen = torch.Generator()
    first = getattr(loader, "first_batch", 0)
    labels, preds, robust = [], [], []
    verified = {v.key: [] for v in verifiers}
    margins = {v.key: [] for v in verifiers}
    for b, (x, y) in enumerate(loader, start=first):
        gen.manual_seed(seed * 1_000_003 + b)
        x, y = x.to(device), y.to(device)
        lower, upper = box_fn(x, eps)
        with torch.no_grad():
            logits = net(x)
        labels.append(y.cpu())
        preds.append(logits.argmax(1).cpu())
        ok, _ = pgd_attack(net.model, x, y, lower, upper, pgd, generator=gen)
        robust.append((ok & (logits.argmax(1) == y)).cpu())
        for v in verifiers:
            with torch.no_grad():
                _, lb = net.margin_bounds(x, y, lower, upper, v)
            m = lb.min(1).values.cpu()
            margins[v.key].append(m)
            verified[v.key].append(m > 0)
        if progress is not None:
            progress(len(y))
    result = EvalResult(
        eps=eps, label=torch.cat(labels), pred=torch.cat(preds), pgd_robust=torch.cat(robust),
        verified={v: torch.cat(t) for v, t in verified.items()},
        margin_lb={v: torch.cat(t) for v, t in margins.items()})
    result.check_invariants()
    return result
