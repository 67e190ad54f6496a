"""The paradox of certified training (Jovanovic et al., TMLR 2022, "On the paradox of certified
training"; the talk's slide "Bad Gradients from Precise Relaxation"): training with a tighter
relaxation (CROWN / DeepPoly, CROWN-IBP) certifies less than training with IBP, and the paper
blames two properties of the loss besides tightness: continuity and sensitivity.

    python -m experiments.paradox [--quick] [--seeds 0 1 2] [--eps 0.1 0.2] [--epochs N]
                                  [--variants ...] [--out DIR] [overrides ...]

Training. One small network, ``mlp`` with hidden widths [64, 64] and no BatchNorm (the
2×100 net of Wong & Kolter and Zhu et al., narrowed to keep full-CROWN training affordable on a
CPU), trained on the digits at each ε with
the schedule of ``experiments.compare_methods`` (``--epochs`` 24) and each method's default
config (PyTorch's init, pure robust loss): ``ibp`` (``method=ibp``), ``fast`` (IBP with IBP
initialisation and the warmup regularisers of Shi et al. 2021, the IBP that trains with a
short ramp), ``crown_ibp``
(``method=crown_ibp``: β 1 → 0, loss fusion), ``crown`` (``method=crown
method.relaxation=adaptive``: CROWN / DeepPoly, the lower ReLU slope 1[u > -l]) and
``crown_same_slope`` (``method=crown``: the same-slope band of Fast-Lin / Wong & Kolter, the
"DeepZ / CAP / FastLin" row of the paper). Each is certified on the 360 test digits by IBP,
CROWN-IBP and CROWN (``eval.verifiers``).

Tightness of each relaxation R on each trained network (test digits at the training ε): the
mean over examples and margins y - j of (empirical range of the margin over the box) / (R's
bound range ū_R - l̲_R), the empirical range from projected sign-gradient ascent and descent
on each margin (a lower bound of the true range, so the ratio is in (0, 1], 1 = exact); and
Mao et al.'s propagation tightness τ of IBP (:mod:`fastcert.tightness`).

Continuity and sensitivity (Sec. 4 of Jovanovic et al.: a relaxation is continuous when its
bounds, hence the loss, are continuous functions of the weights; it is sensitive when small
changes of the weights change the loss much). For each relaxation R the loss is the robust
cross entropy on R's margin lower bounds on a fixed batch of 64 training digits at ε, at two
parameter points θ: the initialised network and the IBP-trained one (seed 0).
*Continuity*: L_R(θ + t·d) for t on a grid of ``--grid`` (101) points over [-0.25, 0.25], d a
random direction normalised per row of each weight matrix to that row's norm (biases fixed;
Li et al. 2018), two directions, with dL/dt from autograd at each grid point. An interval
whose change departs from the trapezoid prediction h·(g_i + g_(i+1))/2 by more than
1e-4·max(1, |L|) is a candidate (a kink departs by O(h·Δg), a jump by its size); it is bisected
12 times following the larger change and counted as a jump when the change across the final
interval (1/4096 of a grid step) is more than 8× what the end slopes explain.
*Sensitivity*: the mean over 10 such directions of |L_R(θ + σ·d) - L_R(θ)| / σ for σ = 1e-3 and
1e-2, and (how rugged the landscape is, the non-smoothness later work names beside it) the mean
relative change of the gradient ‖∇L_R(θ + σ·d) - ∇L_R(θ)‖ / ‖∇L_R(θ)‖ at σ = 1e-3.

Writes ``<out>/runs.csv`` (every training run: accuracies by verifier, τ), ``<out>/summary.csv``
(mean ± std over seeds), ``<out>/relaxations.csv`` (tightness of each relaxation on each trained
network), ``<out>/landscape.csv`` (jumps and sensitivity per point, ε, relaxation),
``<out>/lines.csv`` (the loss along the first direction), ``<out>/claims.csv`` and
``<out>/paradox.png``; the runs under ``<out>/eps<ε>/<variant>-s<seed>/``. ``--quick``: seed 0,
ε 0.1, 3 epochs, 120 test digits, a 41-point grid, one direction.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.compare_methods import schedule
from experiments.science import (
    add_training_arguments,
    compose,
    mean_and_std,
    print_claims,
    pyplot,
    train,
    training_plan,
    write_tables,
)
from fastcert.bounds import Bound, compute_bounds, margin_spec, robust_ce_from_margins
from fastcert.train import read_metrics

VARIANTS = {
    "ibp": ["method=ibp"],
    "fast": ["method=fast"],
    "crown_ibp": ["method=crown_ibp"],
    "crown": ["method=crown", "method.relaxation=adaptive"],
    "crown_same_slope": ["method=crown", "method.relaxation=same-slope"],
}
#: relaxation name -> (bound, auto_LiRPA ReLU relaxation of the BoundedModule view)
RELAXATIONS = {
    "IBP": (Bound.IBP, "adaptive"),
    "CROWN-IBP": (Bound.CROWN_IBP, "adaptive"),
    "CROWN": (Bound.CROWN, "adaptive"),
    "CROWN same-slope": (Bound.CROWN, "same-slope"),
}
VERIFIERS = ("ibp", "crown_ibp", "crown")
MODEL = ["model=mlp", "model.widths=[64,64]", "model.bn=none"]
SPAN, JUMP_TOL = 0.25, 1e-4
#: Bisections of each candidate interval in :func:`count_jumps`.
BISECT = 12
SIGMAS = (1e-3, 1e-2)
CLAIM = ("Jovanovic et al. 2022: tighter relaxations certify less after training; their losses "
         "are discontinuous (CROWN, CROWN-IBP) or more sensitive")


def overrides(variant: str, eps: float, seed: int, epochs: int, extra=()) -> list[str]:
    return ["data=digits", *MODEL, *VARIANTS[variant], f"eps={eps}", f"seed={seed}",
            "optim.lr=1e-3", f"eval.verifiers=[{','.join(VERIFIERS)}]", "device=cpu",
            "cpu_threads=1", *schedule(epochs), *extra]


# ------------------------------------------------------------------------ bounds and losses


def margin_range(net, x, y, lower, upper, relaxation: str):
    """Lower and upper bounds (B, K-1) of the margins y - j over the box under ``relaxation``."""
    bound, relu = RELAXATIONS[relaxation]
    module = net.relaxed(relu)
    module(net.perturbed(x, lower, upper))
    return compute_bounds(module, bound, C=margin_spec(y, net.num_classes))


def relaxation_loss(net, x, y, lower, upper, relaxation: str, grad: bool = False):
    """Robust cross entropy on ``relaxation``'s margin lower bounds (Gowal et al. 2018): a
    float, or the loss tensor with its graph when ``grad``."""
    bound, relu = RELAXATIONS[relaxation]
    module = net.relaxed(relu)
    with torch.set_grad_enabled(grad):
        module(net.perturbed(x, lower, upper))
        lb, _ = compute_bounds(module, bound, C=margin_spec(y, net.num_classes),
                               bound_upper=False)
        loss = robust_ce_from_margins(lb)
    return loss if grad else loss.item()


def empirical_range(model, x, y, lower, upper, num_classes: int, steps: int = 40,
                    seed: int = 0) -> torch.Tensor:
    """max - min (B, K-1) of each margin y - j over points of the box found by projected
    sign-gradient ascent and descent from a random start (the clean point counts too): a lower
    bound of the true range."""
    b, t = x.shape[0], num_classes - 1
    spec = margin_spec(y, num_classes)                                   # (B, T, K)
    g = torch.Generator().manual_seed(seed)
    lo, up = lower.unsqueeze(1), upper.unsqueeze(1)                      # (B, 1, ...)
    z = lo + (up - lo) * torch.rand((b, 2 * t) + x.shape[1:], generator=g)
    sign = torch.cat([torch.ones(t), -torch.ones(t)]).view(1, 2 * t)    # ascend, descend
    rows = torch.arange(t).repeat(2)

    def margins(points):
        logits = model(points.flatten(0, 1)).view(b, 2 * t, num_classes)
        return torch.einsum("bsk,bsk->bs", spec[:, rows], logits)

    with torch.no_grad():
        clean = torch.einsum("btk,bk->bt", spec, model(x))
        best_hi, best_lo = clean.clone(), clean.clone()
    for step in range(steps):
        z.requires_grad_(True)
        m = margins(z)
        (grad,) = torch.autograd.grad((sign * m).sum(), z)
        with torch.no_grad():
            best_hi = torch.maximum(best_hi, m[:, :t])
            best_lo = torch.minimum(best_lo, m[:, t:])
            size = 0.25 if step < steps // 2 else 0.05
            z = torch.minimum(torch.maximum(z + size * (up - lo) * grad.sign(), lo), up)
    with torch.no_grad():
        m = margins(z)
        best_hi = torch.maximum(best_hi, m[:, :t])
        best_lo = torch.minimum(best_lo, m[:, t:])
    return best_hi - best_lo


def relaxation_tightness(net, x, y, lower, upper) -> dict[str, float]:
    """Per relaxation: mean over examples and margins of empirical range / bound range (a
    range beyond the bounds by more than float32 rounding is an error: the bounds are sound)."""
    model = net.model.eval()
    empirical = empirical_range(model, x, y, lower, upper, net.num_classes)
    out = {}
    with torch.no_grad():
        for name in RELAXATIONS:
            lb, ub = margin_range(net, x, y, lower, upper, name)
            bound = ub - lb
            if (empirical > bound + 1e-4 * bound.abs() + 1e-5).any():  # float32 rounding aside
                raise AssertionError(f"{name}: a margin's empirical range exceeds its bounds")
            # both floored at 1e-7: a margin a (collapsed) network holds constant counts as exact
            out[name] = ((empirical + 1e-7) / (bound + 1e-7)).clamp(max=1.0).mean().item()
    return out


# ------------------------------------------------------------------- the loss landscape


@dataclass
class Line:
    """θ + t·d for the parameters of ``net`` (restored by :meth:`reset`)."""

    net: object
    origin: list[torch.Tensor]
    direction: list[torch.Tensor]

    @classmethod
    def random(cls, net, seed: int) -> Line:
        """A direction normalised per row of each weight matrix to that row's norm (biases
        and other vectors fixed), Li et al. 2018's filter normalisation."""
        g = torch.Generator().manual_seed(seed)
        origin = [p.detach().clone() for p in net.model.parameters()]
        direction = []
        for p in origin:
            if p.dim() < 2:
                direction.append(torch.zeros_like(p))
                continue
            d = torch.randn(p.shape, generator=g)
            rows_p, rows_d = p.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)
            scale = (rows_p / rows_d.clamp_min(1e-12)).view(-1, *[1] * (p.dim() - 1))
            direction.append(d * scale)
        return cls(net, origin, direction)

    def set(self, t: float) -> None:
        with torch.no_grad():
            for p, p0, d in zip(self.net.model.parameters(), self.origin, self.direction):
                p.copy_(p0 + t * d)

    def reset(self) -> None:
        self.set(0.0)


def count_jumps(loss, ts: list[float], values: list[float], slopes: list[float]) -> list[float]:
    """Sizes of the jumps of ``loss`` (a function of t) between the grid points ``ts``, given
    its values and its one-sided derivatives dL/dt there (see the module docstring): an
    interval is a candidate where its change departs from the trapezoid prediction
    h·(g_i + g_(i+1))/2 by more than the tolerance (the 20 largest departures); it is
    bisected :data:`BISECT` times, following the larger change, and is a jump where the change
    across the last interval is more than 8× what the larger end slope explains."""
    tol = JUMP_TOL * max(1.0, max(abs(v) for v in values))
    residual = [abs((values[i + 1] - values[i]) - (ts[i + 1] - ts[i]) *
                    (slopes[i] + slopes[i + 1]) / 2) for i in range(len(ts) - 1)]
    candidates = sorted((i for i, r in enumerate(residual) if r > tol),
                        key=lambda i: -residual[i])[:20]
    jumps = []
    for i in candidates:
        a, b, la, lb = ts[i], ts[i + 1], values[i], values[i + 1]
        for _ in range(BISECT):
            m = (a + b) / 2
            lm = loss(m)
            if abs(lm - la) >= abs(lb - lm):
                b, lb = m, lm
            else:
                a, la = m, lm
        smooth = (b - a) * max(abs(slopes[i]), abs(slopes[i + 1]))
        if abs(lb - la) > max(8 * smooth, 1e-6 * max(1.0, abs(la))):
            jumps.append(abs(lb - la))
    return jumps


def gradient(net, x, y, lower, upper, name: str, params) -> torch.Tensor:
    """∇_θ L_R at the current parameters, flattened."""
    value = relaxation_loss(net, x, y, lower, upper, name, grad=True)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(grads, params)])


def landscape(net, x, y, lower, upper, grid: int, directions: int,
              sensitivity_dirs: int = 10) -> tuple[list[dict], list[dict]]:
    """Per relaxation: jumps along ``directions`` lines and the sensitivity; and the loss along
    the first line (rows for lines.csv)."""
    ts = [SPAN * (2 * i / (grid - 1) - 1) for i in range(grid)]
    rows, samples = [], []
    # auto_LiRPA builds the graph to the weights in training mode only; the network has no
    # BatchNorm (nor dropout), so both modes compute the same bounds
    net.train()
    lines = [Line.random(net, 1000 + k) for k in range(max(directions, sensitivity_dirs))]
    params = list(net.model.parameters())
    for name in RELAXATIONS:
        jumps = []
        for k in range(directions):
            line = lines[k]

            def loss(t, line=line, name=name):
                line.set(t)
                return relaxation_loss(net, x, y, lower, upper, name)

            values, slopes = [], []
            for t in ts:
                line.set(t)
                value = relaxation_loss(net, x, y, lower, upper, name, grad=True)
                grads = torch.autograd.grad(value, params, allow_unused=True)
                values.append(value.item())
                slopes.append(sum((g * d).sum().item() for g, d in zip(grads, line.direction)
                                  if g is not None))
            jumps.append(count_jumps(loss, ts, values, slopes))
            if k == 0:
                samples += [{"relaxation": name, "t": t, "loss": v, "slope": g}
                            for t, v, g in zip(ts, values, slopes)]
            line.reset()
        base = relaxation_loss(net, x, y, lower, upper, name)
        row = {"relaxation": name, "loss": base, "directions": directions,
               "jumps": sum(len(j) for j in jumps) / directions,
               "max_jump": max((max(j) for j in jumps if j), default=0.0),
               "mean_jump": (sum(sum(j) for j in jumps) / max(1, sum(len(j) for j in jumps)))}
        for sigma in SIGMAS:
            changes = []
            for line in lines[:sensitivity_dirs]:
                line.set(sigma)
                changes.append(abs(relaxation_loss(net, x, y, lower, upper, name) - base) / sigma)
                line.reset()
            row[f"sensitivity_{sigma:g}"] = statistics.mean(changes)
        grad0 = gradient(net, x, y, lower, upper, name, params)
        moved = []
        for line in lines[:sensitivity_dirs]:
            line.set(SIGMAS[0])
            moved.append((gradient(net, x, y, lower, upper, name, params) - grad0).norm().item()
                         / grad0.norm().clamp_min(1e-12).item())
            line.reset()
        row[f"gradient_change_{SIGMAS[0]:g}"] = statistics.mean(moved)
        rows.append(row)
    return rows, samples


# ----------------------------------------------------------------------------- the runs


def load_net(cfg, run_dir: Path | None):
    """The network of ``cfg`` as built (initialised), or with ``run_dir``'s trained weights,
    and its test digits at the training ε."""
    from fastcert.pipeline import build
    from fastcert.settings import validate

    built = build(validate(cfg), torch.device("cpu"))
    if run_dir is not None:
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        built.net.model.load_state_dict(state["model"])
    built.net.eval()
    return built


def batch_of(loader, n: int):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        if sum(len(v) for v in ys) >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(
        p, "paradox", 24, "seed 0, ε 0.1, 3 epochs, 120 test digits, 41-point grid, 1 direction")
    p.add_argument("--eps", type=float, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--grid", type=int, default=None, help="points per line (101; quick 41)")
    p.add_argument("--directions", type=int, default=None, help="lines per point (2; quick 1)")
    args = p.parse_args(argv)
    epsilons = args.eps or ([0.1] if args.quick else [0.1, 0.2])
    grid = args.grid or (41 if args.quick else 101)
    directions = args.directions or (1 if args.quick else 2)
    if "ibp" not in args.variants:
        p.error("--variants: ibp is needed (the landscape is measured at the IBP-trained net)")
    seeds, epochs, extra = training_plan(args, 24)
    out = Path(args.out)
    t0 = time.perf_counter()
    runs, relax_rows, land_rows, line_rows = [], [], [], []
    for eps in epsilons:
        for variant in args.variants:
            for seed in seeds:
                cfg_args = overrides(variant, eps, seed, epochs, extra)
                run_dir = out / f"eps{eps:g}" / f"{variant}-s{seed}"
                results = train(cfg_args, run_dir, group="paradox")
                built = load_net(compose(cfg_args), run_dir)
                x, y = batch_of(built.data.test, len(built.data.test.dataset))
                tight = relaxation_tightness(built.net, x, y, *built.data.eps_box(x, eps))
                relax_rows += [{"variant": variant, "eps": eps, "seed": seed, "relaxation": k,
                                "tightness": v} for k, v in tight.items()]
                runs.append({"variant": variant, "eps": eps, "seed": seed,
                             "clean_acc": results["clean_acc"],
                             **{f"{v}_verified_acc": results[f"{v}_verified_acc"]
                                for v in VERIFIERS},
                             "any_verified_acc": results["any_verified_acc"],
                             "tau_ibp": read_metrics(run_dir / "metrics.jsonl")[-1]["tightness"],
                             **{f"tightness_{k}": v for k, v in tight.items()}})
        ibp_args = overrides("ibp", eps, seeds[0], epochs, extra)
        for point, run_dir in (("init", None), ("ibp-trained", out / f"eps{eps:g}" /
                                                f"ibp-s{seeds[0]}")):
            built = load_net(compose(ibp_args), run_dir)
            x, y = batch_of(built.data.train, 64)
            rows, samples = landscape(built.net, x, y, *built.data.eps_box(x, eps), grid,
                                      directions)
            land_rows += [{"point": point, "eps": eps, **r} for r in rows]
            line_rows += [{"point": point, "eps": eps, **s} for s in samples]
    summary = summarize(runs)
    checks = claims(summary, land_rows)
    write_tables(out, {"runs": runs, "summary": summary, "relaxations": relax_rows,
                       "landscape": land_rows, "lines": line_rows, "claims": checks})
    plot(summary, land_rows, line_rows, out / "paradox.png")
    report(summary, land_rows, checks, epochs, seeds)
    print(f"{len(runs)} runs, {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return {"runs": runs, "summary": summary, "landscape": land_rows, "claims": checks}


SUMMARY_KEYS = ("clean_acc", *(f"{v}_verified_acc" for v in VERIFIERS), "any_verified_acc",
                "tau_ibp", *(f"tightness_{k}" for k in RELAXATIONS))


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for eps in sorted({r["eps"] for r in runs}):
        for variant in VARIANTS:
            group = [r for r in runs if (r["eps"], r["variant"]) == (eps, variant)]
            if not group:
                continue
            row = {"variant": variant, "eps": eps, "seeds": len(group)}
            for key in SUMMARY_KEYS:
                row[key], row[f"{key}_std"] = mean_and_std(r[key] for r in group)
            out.append(row)
    return out


def claims(summary: list[dict], land: list[dict]) -> list[dict]:
    """The paradox (IBP-trained certifies most, by its best verifier), the tightness order of
    the relaxations on the IBP-trained network, and the continuity / sensitivity the paper
    attributes: jumps for CROWN and CROWN-IBP, none for IBP and same-slope CROWN; CROWN's loss
    more sensitive than IBP's."""
    out = []
    for eps in sorted({r["eps"] for r in summary}):
        get = {r["variant"]: r for r in summary if r["eps"] == eps}
        for ibp in ("ibp", "fast"):
            for other in ("crown_ibp", "crown", "crown_same_slope"):
                if ibp in get and other in get:
                    a, b = get[ibp]["any_verified_acc"], get[other]["any_verified_acc"]
                    out.append({"claim": f"eps={eps:g}: {ibp}-trained certifies more than "
                                         f"{other}-trained",
                                "values": f"{100 * a:.1f} > {100 * b:.1f}", "held": a > b})
        if "ibp" in get:
            t = [get["ibp"][f"tightness_{k}"] for k in ("IBP", "CROWN-IBP", "CROWN")]
            out.append({"claim": f"eps={eps:g}: tightness on the IBP-trained net CROWN > "
                                 f"CROWN-IBP > IBP",
                        "values": f"{t[2]:.3f} > {t[1]:.3f} > {t[0]:.3f}",
                        "held": t[2] > t[1] > t[0]})
        for point in ("init", "ibp-trained"):
            rows = {r["relaxation"]: r for r in land if (r["eps"], r["point"]) == (eps, point)}
            if not rows:
                continue
            cont = [rows[k]["jumps"] for k in ("IBP", "CROWN same-slope")]
            disc = [rows[k]["jumps"] for k in ("CROWN-IBP", "CROWN")]
            out.append({"claim": f"eps={eps:g}, {point}: jumps only for CROWN-IBP and CROWN "
                                 f"(IBP, same-slope CROWN, CROWN-IBP, CROWN)",
                        "values": " / ".join(f"{v:g}" for v in cont + disc),
                        "held": max(cont) == 0 and min(disc) > 0})
            s = {k: rows[k]["sensitivity_0.001"] for k in ("IBP", "CROWN")}
            out.append({"claim": f"eps={eps:g}, {point}: CROWN loss more sensitive than IBP's "
                                 f"(sigma=1e-3)", "values": f"{s['CROWN']:.3g} > {s['IBP']:.3g}",
                        "held": s["CROWN"] > s["IBP"]})
    return out


def plot(summary: list[dict], land: list[dict], lines: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    epsilons = sorted({r["eps"] for r in summary})
    variants = list(dict.fromkeys(r["variant"] for r in summary))
    width = 0.8 / max(1, len(epsilons) * len(VERIFIERS))
    ax = axes[0][0]
    for i, variant in enumerate(variants):
        for j, eps in enumerate(epsilons):
            row = next(r for r in summary if (r["variant"], r["eps"]) == (variant, eps))
            for k, v in enumerate(VERIFIERS):
                slot = j * len(VERIFIERS) + k - (len(epsilons) * len(VERIFIERS) - 1) / 2
                pos = i + slot * width
                ax.bar(pos, 100 * row[f"{v}_verified_acc"], width, color=f"C{k}",
                       alpha=1.0 if j == 0 else 0.55,
                       label=f"{v} verifier, ε={eps:g}" if i == 0 else None)
    ax.set_xticks(range(len(variants)), [f"{v}\ntrained" for v in variants], fontsize=8)
    ax.set(ylabel="certified accuracy % (test digits)", title="certified accuracy by verifier")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    names = list(RELAXATIONS)
    for i, variant in enumerate(variants):
        row = next(r for r in summary if (r["variant"], r["eps"]) == (variant, epsilons[0]))
        ax.bar([k + (i - (len(variants) - 1) / 2) * 0.8 / len(variants) for k in range(len(names))],
               [row[f"tightness_{n}"] for n in names], 0.8 / len(variants),
               label=f"{variant}-trained")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(ylabel="empirical / bound margin range", ylim=(0, 1),
           title=f"tightness of each relaxation (ε={epsilons[0]:g})")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    eps0 = epsilons[0]
    for k, name in enumerate(names):
        pts = [r for r in lines if (r["point"], r["eps"], r["relaxation"]) ==
               ("ibp-trained", eps0, name)]
        jumps = next(r for r in land if (r["point"], r["eps"], r["relaxation"]) ==
                     ("ibp-trained", eps0, name))["jumps"]
        ax.plot([r["t"] for r in pts], [r["loss"] for r in pts], color=f"C{k}", lw=1,
                label=f"{name} ({jumps:g} jumps/line)")
    ax.set(yscale="log", xlabel="t (θ + t·d, d filter-normalised)",
           ylabel="robust CE on the relaxation's bounds",
           title=f"continuity: loss along a line at the IBP-trained net (ε={eps0:g})")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    points = ("init", "ibp-trained")
    for i, point in enumerate(points):
        rows = {r["relaxation"]: r for r in land if (r["point"], r["eps"]) == (point, eps0)}
        ax.bar([k + (i - 0.5) * 0.4 for k in range(len(names))],
               [rows[n]["sensitivity_0.001"] for n in names], 0.4, label=point)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(yscale="log", ylabel="mean |ΔL| / σ, σ = 1e-3",
           title=f"sensitivity to weight perturbations (ε={eps0:g})")
    ax.legend(fontsize=7)
    fig.suptitle(CLAIM + " (digits, MLP 2×64)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(summary, land, checks, epochs, seeds) -> None:
    print(f"\n{CLAIM}; digits, mlp 2x64, {epochs} epochs, seeds {seeds}")
    print("| ε | trained with | clean | IBP-ver. | CROWN-IBP-ver. | CROWN-ver. | τ (IBP) | "
          + " | ".join(f"tight. {k}" for k in RELAXATIONS) + " |")
    print("|---" * (7 + len(RELAXATIONS)) + "|")
    for r in summary:
        print(f"| {r['eps']:g} | {r['variant']} | {100 * r['clean_acc']:.1f} | "
              + " | ".join(f"{100 * r[f'{v}_verified_acc']:.1f} ± "
                           f"{100 * r[f'{v}_verified_acc_std']:.1f}" for v in VERIFIERS)
              + f" | {r['tau_ibp']:.3f} | "
              + " | ".join(f"{r[f'tightness_{k}']:.3f}" for k in RELAXATIONS) + " |")
    print("\n| ε | point | relaxation | loss | jumps/line | max jump | sensitivity 1e-3 | 1e-2 | "
          "gradient change 1e-3 |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|")
    for r in land:
        print(f"| {r['eps']:g} | {r['point']} | {r['relaxation']} | {r['loss']:.4g} | "
              f"{r['jumps']:g} | {r['max_jump']:.3g} | {r['sensitivity_0.001']:.3g} | "
              f"{r['sensitivity_0.01']:.3g} | {r['gradient_change_0.001']:.3g} |")
    print_claims(checks)


if __name__ == "__main__":
    main()
