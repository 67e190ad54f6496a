"""Test-set evaluation at one ε: clean, attacked and verified accuracy from one network state.

Every metric reads the same :class:`BoundedNet` in eval mode. Per example:

* clean: the prediction of the clean input (``net(x)``, the graph the bounds use);
* attack: an attack (:class:`fastcert.attacks.PGDConfig`, cheap, or
  :class:`fastcert.attacks.StrongAttack`) inside the box the verifiers bound; ``pgd_robust``
  = clean-correct and not broken; ``attack_margin`` = the smallest margin f_y - max_{j≠y} f_j
  it saw;
* verifiers (:class:`fastcert.bounds.Bound`): the lower bound m̲ = min_j m̲_j of the margins
  over the box; verified iff m̲ > 0 (Eq. 2 of Shi et al. 2021). Either every verifier runs on
  every example (``cascade=False``: the training-end evaluation, where each verifier's own
  accuracy is reported), or as a cascade IBP → CROWN-IBP → CROWN → α-CROWN, each stage only on
  the examples still undecided — clean-correct, not broken by the attack, not verified by an
  earlier stage (``cascade=True``: ``fastcert.certify``).

Soundness: a certificate m̲ > 0 says every point of the box has margin ≥ m̲, so the attack's
margin must be ≥ m̲. When it is below m̲ by more than the tie tolerance :func:`tie_tolerance`
(1e-5 · max(1, max_k |f_k(x)|): float32 rounding of two forward passes of the same input, the
bounded graph and the plain module, differs by ~1e-7 relative), the example is recorded as a
*violation* (an unsound bound or a broken attack) in :attr:`EvalResult.violations`; within the
tolerance it is a *tie*, counted in :attr:`EvalResult.ties` and the example is not counted as
verified, so verified ⇒ attack-robust ⇒ clean-correct holds for every reported example. The
caller writes its results first and then raises :class:`SoundnessError`
(:meth:`EvalResult.raise_if_unsound`), so a violation never throws a run away.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fastcert import memory
from fastcert.attacks import AttackResult, PGDConfig
from fastcert.bounds import Bound, BoundedNet, alpha_crown_margins, margin_spec
from fastcert.seeding import stream_seed

#: Relative tolerance for a tie between a certified margin and an attack's margin.
TIE_RTOL = 1e-5

#: The cascade's order (:data:`Bound` keys): cheapest and loosest first.
CASCADE = ("ibp", "crown_ibp", "crown", "alpha_crown")


def tie_tolerance(logits: torch.Tensor) -> torch.Tensor:
    """Per example, how far an attack's margin may fall below a certified margin lower bound
    before it is a violation: 1e-5 · max(1, max_k |f_k(x)|)."""
    return TIE_RTOL * logits.abs().amax(1).clamp_min(1.0)


@dataclass(frozen=True)
class EvalConfig:
    """The final test evaluation (``conf/eval/default.yaml``): the verifiers (keys of
    :class:`fastcert.bounds.Bound`: ibp, crown_ibp, crown, alpha_crown), the cheap PGD attack
    of the training-end metrics, and the test radius ``eps`` in pixel units (null: the
    training radius; e.g. CROWN-IBP's MNIST setting trains at 0.4 and tests at 0.3, Zhang et
    al. 2020 Table 2)."""

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
    """A certified example was broken by the attack beyond the tie tolerance."""


@dataclass
class EvalResult:
    eps: float
    label: torch.Tensor
    pred: torch.Tensor
    pgd_robust: torch.Tensor                 # clean-correct and not broken by the attack
    attack_margin: torch.Tensor              # smallest margin the attack saw (clean included)
    verified: dict[str, torch.Tensor] = field(default_factory=dict)   # verifier -> bool (N,)
    margin_lb: dict[str, torch.Tensor] = field(default_factory=dict)  # min_j m̲_j, NaN: not run
    ran: dict[str, torch.Tensor] = field(default_factory=dict)        # verifier -> bool (N,)
    stage_time_s: dict[str, float] = field(default_factory=dict)      # attack, each verifier
    violations: list[dict] = field(default_factory=list)
    ties: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)  # attack, each verifier: bytes

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.pred == self.label

    @property
    def verified_any(self) -> torch.Tensor:
        out = torch.zeros_like(self.label, dtype=torch.bool)
        for v in self.verified.values():
            out |= v
        return out

    def decided_by(self) -> list[str]:
        """Per example, what decided it: ``clean`` (misclassified), ``attack`` (broken), the
        first verifier (cascade order) that verified it, or ``""`` (undecided)."""
        out = []
        for i in range(len(self.label)):
            if not self.clean_correct[i]:
                out.append("clean")
            elif not self.pgd_robust[i]:
                out.append("attack")
            else:
                out.append(next((v for v in CASCADE if v in self.verified and
                                 bool(self.verified[v][i])), ""))
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

    def raise_if_unsound(self) -> None:
        if self.violations:
            v = self.violations[0]
            raise SoundnessError(
                f"eps={self.eps}: {len(self.violations)} soundness violation(s); e.g. test "
                f"example {v['index']} is {v['verifier']}-verified (margin lower bound "
                f"{v['margin_lb']:.6g}) but the attack found margin {v['attack_margin']:.6g} "
                f"(tie tolerance {v['tolerance']:.3g}): the {v['verifier']} bound is unsound "
                f"or the attack left the box")


def judge(margin_lb: torch.Tensor, attack_margin: torch.Tensor, robust: torch.Tensor,
          tolerance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example (NaN ``margin_lb``: the verifier did not run): ``(verified, tie,
    violation)``. Certified is m̲ > 0; a violation is a certified example whose attack margin
    lies below m̲ by more than ``tolerance``; a tie is a certified example that is not
    attack-robust (or not clean-correct) within the tolerance; verified = certified and
    robust, so a tie is never counted as verified."""
    certified = margin_lb > 0
    violation = certified & (attack_margin < margin_lb - tolerance)
    tie = certified & ~robust & ~violation
    return certified & robust, tie, violation


def _margin_lb(net: BoundedNet, x, y, lower, upper, bound: Bound) -> torch.Tensor:
    """min_j m̲_j per example; α-CROWN's is never below CROWN's
    (:func:`fastcert.bounds.alpha.alpha_crown_margins`)."""
    if bound is Bound.ALPHA_CROWN:
        lb, _ = alpha_crown_margins(net.bounded, net.perturbed(x, lower, upper),
                                    margin_spec(y, net.num_classes))
        return lb.min(1).values
    with torch.no_grad():
        return net.margin_bounds(x, y, lower, upper, bound)[1].min(1).values


def _attack(net: BoundedNet, pgd, x, y, lower, upper, gen: torch.Generator,
            budget: memory.Budget) -> tuple[torch.Tensor, AttackResult]:
    """Clean logits and the attack on one test batch, in chunks of the budget's attack phase.
    One chunk (the batch fits): the batch's generator ``gen``, as unchunked; several: chunk k
    draws from a generator seeded with stream_seed(seed of ``gen``, k) mod 2⁶³."""
    budget.probe("attack", lambda: pgd.run(net.model, x[:1], y[:1], lower[:1], upper[:1],
                                           torch.Generator().manual_seed(0)))
    n = len(y)
    size = budget.chunk("attack", cap=False) or n
    logits, robust, margin = [], [], []
    base = gen.initial_seed()
    for k, i in enumerate(range(0, n, size)):
        part = slice(i, i + size)
        if size < n:
            gen = torch.Generator().manual_seed(stream_seed(base, k) % 2**63)
        with torch.no_grad():
            logits.append(net(x[part]))
        result = budget.run("attack", lambda part=part, gen=gen: pgd.run(
            net.model, x[part], y[part], lower[part], upper[part], gen))
        robust.append(result.robust)
        margin.append(result.margin)
    return torch.cat(logits), AttackResult(torch.cat(robust), None, torch.cat(margin))


def _chunked_margin_lb(net: BoundedNet, budget: memory.Budget, verifier: str,
                       todo: torch.Tensor, x, y, lower, upper) -> torch.Tensor:
    """``verifier``'s min_j m̲_j on the examples ``todo`` (NaN elsewhere), in the budget's
    chunks."""
    lb = torch.full(y.shape, float("nan"), device=x.device)
    i = torch.nonzero(todo).flatten()
    if len(i):
        xi, yi, li, ui = x[i], y[i], lower[i], upper[i]
        bound = Bound.parse(verifier)
        lb[i] = torch.cat(budget.map(verifier, len(i), lambda c: _margin_lb(
            net, xi[c], yi[c], li[c], ui[c], bound)))
    return lb


#: The cheap attack of :func:`evaluate` unless given.
DEFAULT_PGD = PGDConfig()


def evaluate(net: BoundedNet, loader, box_fn, eps: float, verifiers=("ibp", "crown"),
             pgd=DEFAULT_PGD, device: torch.device | str = "cpu", seed: int = 0,
             progress=None, cascade: bool = False, indices=None,
             memory_gb: float | None = None) -> EvalResult:
    """Evaluate ``net`` on ``loader`` at radius ``eps``.

    ``box_fn(x, eps) -> (lower, upper)`` maps a pixel-space ε to the input box (see
    ``DataBundle.eps_box``). ``verifiers`` are :class:`fastcert.bounds.Bound` values or their
    keys; results are keyed by those names. ``pgd`` is the attack (anything with
    ``.run(model, x, y, lower, upper, generator)``); its random starts of test batch b come from
    a generator seeded with :func:`fastcert.seeding.stream_seed` (``seed``, b), b counted in
    the whole test set (``loader.first_batch`` is a shard's first): the same whether the test
    set is evaluated in one process or in blocks by several. ``cascade``: see the module
    docstring; the verifiers then run in :data:`CASCADE` order. ``indices``: the examples'
    positions in the full test set, for the violation records (default: their position in the
    test set).

    ``memory_gb``: the memory budget in GiB (None: :func:`fastcert.memory.default_memory_gb`, a
    quarter of the machine's memory). The attack and each verifier run their examples in
    chunks sized to it (:class:`fastcert.memory.Budget`); the freed memory kept for training
    steps is given back first (:func:`fastcert.memory.release_freed_memory`).
    """
    keys = [Bound.parse(v).key for v in verifiers]
    if cascade:
        keys = [v for v in CASCADE if v in keys]
    net.eval()
    memory.release_freed_memory()
    budget = memory.Budget(memory_gb)
    gen = torch.Generator()
    first = getattr(loader, "first_batch", 0)
    parts = defaultdict(list)
    times = defaultdict(float)
    violations, ties = [], 0
    offset = first * (getattr(loader, "batch_size", None) or 0)
    for b, (x, y) in enumerate(loader, start=first):
        gen.manual_seed(stream_seed(seed, b))
        x, y = x.to(device), y.to(device)
        lower, upper = box_fn(x, eps)
        t0 = time.perf_counter()
        logits, attack = _attack(net, pgd, x, y, lower, upper, gen, budget)
        times["attack"] += time.perf_counter() - t0
        correct = logits.argmax(1) == y
        robust = attack.robust & correct
        tol = tie_tolerance(logits)
        undecided = robust.clone()
        for v in keys:
            todo = undecided.clone() if cascade else torch.ones_like(robust)
            t0 = time.perf_counter()
            lb = _chunked_margin_lb(net, budget, v, todo, x, y, lower, upper)
            times[v] += time.perf_counter() - t0
            ok, tie, unsound = judge(lb, attack.margin, robust, tol)
            for i in torch.nonzero(unsound).flatten().tolist():
                violations.append({"eps": eps, "index": offset + i, "verifier": v,
                                   "margin_lb": lb[i].item(),
                                   "attack_margin": attack.margin[i].item(),
                                   "tolerance": tol[i].item()})
            ties += int(tie.sum())
            undecided &= ~ok
            parts[f"ran/{v}"].append(todo.cpu())
            parts[f"lb/{v}"].append(lb.cpu())
            parts[f"verified/{v}"].append(ok.cpu())
        parts["label"].append(y.cpu())
        parts["pred"].append(logits.argmax(1).cpu())
        parts["robust"].append(robust.cpu())
        parts["margin"].append(attack.margin.cpu())
        offset += len(y)
        if progress is not None:
            progress(len(y))
    if indices is not None:
        for v in violations:
            v["index"] = int(indices[v["index"]])
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return EvalResult(
        eps=eps, label=cat["label"], pred=cat["pred"], pgd_robust=cat["robust"],
        attack_margin=cat["margin"],
        verified={v: cat[f"verified/{v}"] for v in keys},
        margin_lb={v: cat[f"lb/{v}"] for v in keys},
        ran={v: cat[f"ran/{v}"] for v in keys},
        stage_time_s={k: times[k] for k in ["attack", *keys]},
        violations=violations, ties=ties, peak_rss=dict(budget.peaks))
