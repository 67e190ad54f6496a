"""Attacks under L∞, inside the same clipped box the verifiers bound.

Every iterate is projected onto [lower, upper] — the box the bounds are computed over — so an
attack can never "escape" a certificate: verified ⇒ robust to the attack holds exactly, and a
violation means an unsound bound.

Two attacks, for two jobs:

* :class:`PGDConfig` — plain PGD (Madry et al. 2018), one loss, fixed step: cheap, for the
  per-epoch / training-end metrics (``eval.pgd``, results.json's ``pgd_acc``) and for training
  methods that need adversarial points (SABR, TAPS ...).
* :class:`StrongAttack` — ``python -m fastcert.certify``'s default: APGD (Croce & Hein 2020,
  Alg. 1: momentum 0.75, step size halved at checkpoints when progress stalls, restart from the
  best point) with the margin *and* the cross-entropy loss, from the clean input, from random
  corners of the box and from random points in it; each example is attacked until it is
  broken. Its accuracy is an honest upper bound of robust accuracy: on the default checkpoint
  it breaks everything 20 restarts × 200 steps of PGD with both losses from box corners do
  (tests/test_attacks.py).

Both return an :class:`AttackResult`: per example whether it survived, the worst point found
and the smallest classification margin f_y - max_{j≠y} f_j seen at any evaluated point.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass
class AttackResult:
    """``robust[i]``: every evaluated point (the clean input included, unless PGD's
    ``evaluate_x`` is False) has margin > 0;
    ``x_adv``: the attack's worst point (PGD: of largest loss; APGD: of smallest margin);
    ``margin``: min over the evaluated points x' of f_y(x') - max_{j≠y} f_j(x')."""

    robust: torch.Tensor
    x_adv: torch.Tensor
    margin: torch.Tensor
    logits: torch.Tensor | None = None  # PGDConfig.run's ``final`` logits at x_adv, if any


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j≠y} f_j - f_y per example: positive iff misclassified (the CW-style objective)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return margin_loss(logits, y)


def _start(x, lower, upper, kind: str, generator) -> torch.Tensor:
    """A starting point in the box: ``clean`` (x), ``uniform`` (uniformly random) or ``corner``
    (a random vertex)."""
    if kind == "clean":
        return x.detach().clone()
    u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    if kind == "corner":
        return torch.where(u < 0.5, lower, upper).detach()
    return (lower + u * (upper - lower)).detach()


class _Tracker:
    """The smallest margin per example over every point evaluated, and where it was (unless
    ``points`` is False: margins only); it starts at x with the margins of ``clean_logits``
    (the model's logits at x)."""

    def __init__(self, clean_logits, x, y, points: bool = True):
        with torch.no_grad():
            self.margin = -margin_loss(clean_logits.detach(), y)
        self.x_adv = x.detach().clone() if points else None

    def update(self, idx, points, logits, y):
        with torch.no_grad():
            m = -margin_loss(logits, y)
            better = m < self.margin[idx]
            self.margin[idx[better]] = m[better]
            if self.x_adv is not None:
                self.x_adv[idx[better]] = points[better].detach()

    def result(self) -> AttackResult:
        return AttackResult(self.margin > 0, self.x_adv, self.margin)


class _Best(_Tracker):
    """PGD's record: the tracker's smallest margins (not their points: PGD returns the
    point of largest loss), and per example the point of largest ``loss`` evaluated (x, with
    ``clean_logits``, to start)."""

    def __init__(self, clean_logits, x, y, loss: str):
        super().__init__(clean_logits, x, y, points=False)
        with torch.no_grad():
            self.loss = _objective(clean_logits.detach(), y, loss)
        self.x_best = x.detach().clone()
        self.idx = torch.arange(len(y), device=x.device)

    def update(self, points, logits, loss, y):
        super().update(self.idx, points, logits, y)
        with torch.no_grad():
            better = loss > self.loss
            self.loss = torch.where(better, loss, self.loss)
            self.x_best[better] = points[better].detach()


@dataclass(frozen=True)
class PGDConfig:
    """L∞ PGD: ``restarts`` runs of ``steps`` signed-gradient steps of ``step_size`` × the box
    half-width (``schedule: cosine``: step k of N is ``step_size`` · (1 + cos(πk/N)) / 2, large
    first, vanishing last), maximising ``loss`` (``margin``: max_{j≠y} f_j - f_y; ``ce``: cross
    entropy), each from a random point of the box (``random_start``; ``start``: uniform in the
    box, or a random corner) or from x. ``step_decay``: the step is multiplied by this factor
    at each step index of ``decay_at`` (0-based; steps k ≥ m use it, in every restart), e.g.
    CTBench's TAPS latent search (``_MultiPGDMixin``: ×0.2 from step int(0.7T) for
    10 ≤ T ≤ 50) is ``step_decay=0.2, decay_at=[7]`` at T = 10."""

    steps: int = 20
    restarts: int = 1
    step_size: float = 0.25  # fraction of the box half-width per step (2.5·ε/steps is common)
    loss: Literal["margin", "ce"] = "margin"
    random_start: bool = True
    start: Literal["uniform", "corner"] = "uniform"
    schedule: Literal["constant", "cosine"] = "constant"
    step_decay: float = 1.0
    decay_at: tuple[int, ...] = ()

    def __post_init__(self):
        if self.steps < 0 or self.restarts < 1 or self.step_size <= 0:
            raise ValueError(f"invalid PGD settings {self}: steps >= 0, restarts >= 1, "
                             f"step_size > 0")
        if self.step_decay <= 0 or any(m < 0 for m in self.decay_at):
            raise ValueError(f"invalid PGD step decay {self}: step_decay > 0, decay_at >= 0")

    @property
    def description(self) -> str:
        decay = (f", x{self.step_decay:g} from step{'s' if len(self.decay_at) > 1 else ''} "
                 f"{', '.join(map(str, self.decay_at))}" if self.decay_at else "")
        return (f"PGD {self.steps} steps x {self.restarts} restart(s), {self.loss} loss, step "
                f"{self.step_size:g} x half-width" + (", cosine" if self.schedule == "cosine"
                                                      else "") + decay)

    def step(self, k: int) -> float:
        """The step size of step k, as a fraction of the box half-width."""
        decay = self.step_decay ** sum(k >= m for m in self.decay_at) if self.decay_at else 1.0
        if self.schedule == "cosine":
            return decay * self.step_size * (1 + math.cos(math.pi * k / max(self.steps, 1))) / 2
        return decay * self.step_size

    def run(self, model, x, y, lower, upper, generator=None, clean_logits=None, final=None,
            evaluate_x: bool = True) -> AttackResult:
        """Search the box for misclassified inputs (the caller chooses the model's mode);
        ``x_adv`` is the point of largest ``loss`` found (x when nothing beat it and x is
        evaluated).

        The clean input counts as an evaluated point. ``clean_logits``: the model's logits at
        x where the caller already has them (in the attack's BatchNorm mode), else one
        forward pass computes them; without a random start the first iterate is x and its
        pass serves. One restart thus makes ``steps`` + 1 forward passes (``steps`` + 2 with
        a random start and no ``clean_logits``); the last iterate's keeps no graph.

        ``evaluate_x=False``: x is not a candidate, only the iterates are (from a random start,
        x is then used for its shape alone; without one, x is the first iterate): a search
        whose x is no input, e.g. TAPS's latent pivot search from the box centre, whose record
        starts at the random start (``_get_pivotal_points_one_batch`` of Mao et al.'s code and
        CTBench's). ``steps`` + 1 forward passes per restart; ``robust`` and ``margin`` then
        cover the iterates alone, and ``clean_logits`` is not read.

        ``final``: the caller's own forward pass (the same values as ``model``'s, e.g. with
        the graph a training loss needs) evaluates the last iterate of the last restart in
        place of ``model``; where ``x_adv`` is that iterate (every example's best point is
        the last one), its logits are ``result.logits``, and the caller needs no forward pass
        at ``x_adv`` of its own."""
        if clean_logits is None and self.random_start and evaluate_x:
            with torch.no_grad():
                clean_logits = model(x)
        best = (_Best(clean_logits, x, y, self.loss) if clean_logits is not None and evaluate_x
                else None)
        with torch.no_grad():
            half = (upper - lower) / 2
        move_size, move = None, None  # the last step size and its move, size · half-width
        kept = None
        for restart in range(self.restarts):
            adv = _start(x, lower, upper, self.start if self.random_start else "clean",
                         generator)
            for step in range(self.steps + 1):  # evaluate every iterate, the last one included
                last = step == self.steps
                adv.requires_grad_(not last)
                if last and final is not None and restart == self.restarts - 1:
                    kept = final(adv)
                    logits = kept.detach()
                    loss = _objective(logits, y, self.loss)
                else:
                    with torch.no_grad() if last else contextlib.nullcontext():
                        logits = model(adv)
                        loss = _objective(logits, y, self.loss)
                if best is None:  # the first iterate (x itself, unless evaluate_x is False)
                    best = _Best(logits, adv, y, self.loss)
                best.update(adv, logits, loss, y)
                if last:
                    break
                (grad,) = torch.autograd.grad(loss.sum(), adv)
                size = self.step(step)
                with torch.no_grad():  # x + move·sign(∇), projected, in place (its graph is gone)
                    if size != move_size:
                        move_size, move = size, size * half
                    adv.addcmul_(move, grad.sign_()).clamp_(lower, upper)
        if kept is not None and not torch.equal(best.x_best, adv):
            kept = None
        return AttackResult(best.margin > 0, best.x_best, best.margin, kept)


def pgd_attack(model, x, y, lower, upper, cfg: PGDConfig = PGDConfig(),
               generator: torch.Generator | None = None,
               clean_logits: torch.Tensor | None = None):
    """Search the box for misclassified inputs with PGD. Returns (robust, x_adv).

    ``robust[i]`` is True iff the clean input and every restart's iterates were classified
    correctly; ``x_adv`` holds the point of largest ``cfg.loss`` found per example (the clean
    input when nothing beat it). The caller chooses the model's mode (eval: BatchNorm on
    running statistics, as evaluation requires) and may pass the logits at x it already has
    (:meth:`PGDConfig.run`).
    """
    result = cfg.run(model, x, y, lower, upper, generator, clean_logits)
    return result.robust, result.x_adv


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j · steps): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, Sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps - 1e-9) for q in p if q <= 1})  # (float noise)


def apgd(model, x, y, lower, upper, start, steps: int, loss: str, track: _Tracker,
         idx: torch.Tensor, target: torch.Tensor | None = None) -> None:
    """One APGD run (Croce & Hein 2020, Alg. 1) on the examples ``idx`` of the tracker, from
    ``start``, maximising ``loss`` (``margin``, ``ce``, or ``targeted``: f_t - f_y with t =
    ``target``); every iterate's margin goes to ``track``.

    Step size η starts at 2× the box half-width (2ε); x^(k+1) = P(x^(k) + 0.75 (z - x^(k)) +
    0.25 (x^(k) - x^(k-1))) with z = P(x^(k) + η sign ∇); at each checkpoint η halves and the
    iterate returns to the best point when fewer than 75 % of the steps since the last
    checkpoint increased the loss, or when η was not halved last time and the best loss has
    not moved since.
    """
    half = (upper - lower) / 2
    shape = (-1,) + (1,) * (x.dim() - 1)

    def loss_and_grad(points):
        points = points.detach().requires_grad_(True)
        logits = model(points)
        if loss == "targeted":
            value = (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)
        else:
            value = _objective(logits, y, loss)
        (grad,) = torch.autograd.grad(value.sum(), points)
        track.update(idx, points, logits, y)
        return value.detach(), grad

    def project(points):
        return points.clamp(lower, upper)

    checkpoints = set(apgd_checkpoints(steps))
    eta = torch.full((len(y),), 2.0, device=x.device)
    cur, (f_cur, grad) = start, loss_and_grad(start)
    best_f, best_x = f_cur.clone(), cur.clone()
    prev = cur
    increased = torch.zeros_like(best_f)
    last_check, best_at_check = 0, best_f.clone()
    halved_last = torch.ones_like(best_f, dtype=torch.bool)
    for k in range(steps):
        with torch.no_grad():
            z = project(cur + eta.view(shape) * half * grad.sign())
            momentum = 0.75 if k > 0 else 1.0
            nxt = project(cur + momentum * (z - cur) + (1 - momentum) * (cur - prev))
        prev, cur = cur, nxt
        f_new, grad = loss_and_grad(cur)
        with torch.no_grad():
            increased += (f_new > f_cur).float()
            f_cur = f_new
            better = f_cur > best_f
            best_f = torch.where(better, f_cur, best_f)
            best_x[better] = cur[better]
        if k + 1 in checkpoints:
            stalled = increased < 0.75 * (k + 1 - last_check)
            stuck = ~halved_last & (best_f <= best_at_check)
            halve = stalled | stuck
            eta = torch.where(halve, eta / 2, eta)
            halved_last, best_at_check = halve, best_f.clone()
            increased.zero_()
            last_check = k + 1
            if halve.any():  # back to the best point, with its gradient
                cur = torch.where(halve.view(shape), best_x, cur)
                f_cur, grad = loss_and_grad(cur)


@dataclass(frozen=True)
class StrongAttack:
    """``certify``'s default attack, in three phases, each only on the examples not yet broken:

    1. APGD (:func:`apgd`, ``steps`` steps) from the clean input with the margin loss and with
       cross entropy;
    2. targeted APGD from the clean input toward each of the ``targets`` classes the clean
       logits rank highest after y (loss f_t - f_y, as APGD-T of Croce & Hein 2020 with the
       margin in place of DLR): the untargeted margin follows only the current runner-up;
    3. ``restarts`` runs of PGD with cross entropy and a cosine step-size schedule from
       ``restart_step_size`` × the half-width down to 0 (``restart_steps`` steps), from random
       points, alternately box corners and uniform in the box: some maxima are reached only
       by small steps, which APGD's large steps jump over (on the default checkpoint one
       example falls to ~16 % of such restarts, to ~9 % with a fixed step 0.05 and to none of
       APGD's, targeted or not).

    The defaults were chosen on the default checkpoint (digits, ε = 0.2), where they break
    everything that 20 restarts × 200 steps of PGD with margin and CE losses from box corners
    break, and more (tests/test_attacks.py checks this on a briefly trained one)."""

    steps: int = 100
    targets: int = 9
    restarts: int = 20
    restart_steps: int = 100
    restart_step_size: float = 0.2

    def __post_init__(self):
        if (self.steps < 1 or self.targets < 0 or self.restarts < 0 or self.restart_steps < 1
                or self.restart_step_size <= 0):
            raise ValueError(f"invalid attack settings {self}: steps >= 1, targets >= 0, "
                             f"restarts >= 0, restart_steps >= 1, restart_step_size > 0")

    @property
    def description(self) -> str:
        return (f"APGD-margin/CE {self.steps} steps + APGD-targeted x {self.targets} + "
                f"{self.restarts} restarts of PGD-CE {self.restart_steps} steps, cosine step "
                f"{self.restart_step_size:g}->0 x half-width")

    def run(self, model, x, y, lower, upper, generator=None) -> AttackResult:
        with torch.no_grad():
            clean = model(x)
        track = _Tracker(clean, x, y)
        ranked = clean.argsort(1, descending=True)
        runs = [("margin", None), ("ce", None)]
        runs += [("targeted", k) for k in range(1, min(self.targets, ranked.shape[1] - 1) + 1)]
        for loss, k in runs:
            idx = torch.nonzero(track.margin > 0).flatten()
            if len(idx) == 0:
                return track.result()
            target = None
            if k is not None:  # the k-th ranked class other than y
                order = ranked[idx]
                others = order[order != y[idx, None]].view(len(idx), -1)
                target = others[:, k - 1]
            apgd(model, x[idx], y[idx], lower[idx], upper[idx], x[idx].detach().clone(),
                 self.steps, loss, track, idx, target)
        for r in range(self.restarts):
            idx = torch.nonzero(track.margin > 0).flatten()
            if len(idx) == 0:
                break
            pgd = PGDConfig(steps=self.restart_steps, step_size=self.restart_step_size,
                            loss="ce", start=("corner", "uniform")[r % 2], schedule="cosine")
            sub = pgd.run(model, x[idx], y[idx], lower[idx], upper[idx], generator, clean[idx])
            better = sub.margin < track.margin[idx]
            track.margin[idx[better]] = sub.margin[better]
            track.x_adv[idx[better]] = sub.x_adv[better]
        return track.result()
