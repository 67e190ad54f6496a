"""Propagation tightness over training for natural, PGD, SABR (λ 0.1, 0.4), IBP and fast
training on the digits (Mao et al. ICLR 2024, Sec. 4-5; the talk's slides "IBP Increases
Tightness": "IBP > SABR > PGD consistently in terms of tightness", "larger input box leads to
larger tightness").

    python -m experiments.tightness_training [--quick] [--seeds 0 1 2] [--eps 0.1 0.2]
                                             [--epochs N] [--out DIR] [overrides ...]

Each variant trains ``cnn_small`` on the digits with the schedule of
``experiments.compare_methods`` (``--epochs`` 36: 1 epoch at ε = 0, a smoothed ramp over a
third of the rest, Adam 1e-3 decayed at 75 % and 90 %), at each ε and seed. τ is the run's
per-epoch propagation tightness (:class:`fastcert.tightness.TightnessProbe`: the first 64 test
digits at the training ε); epoch 0 is the initialised network (built as the run builds it). The
variants: ``natural``, ``pgd``, ``sabr_0.1`` / ``sabr_0.4`` (``method=sabr method.lam=λ``),
``ibp`` (vanilla IBP, PyTorch's init) and ``fast`` (IBP + IBP init + warmup regularisers,
Shi et al. 2021).

Writes ``<out>/curves.csv`` (variant, ε, seed, epoch, τ), ``<out>/summary.csv`` (per variant
and ε: τ at init and at the end, clean and IBP-/CROWN-verified test accuracy, mean ± std over
seeds), ``<out>/claims.csv`` (each ordering the talk states, and whether it held) and
``<out>/tightness_training.png``; the runs under ``<out>/eps<ε>/<variant>-s<seed>/`` (a finished
run is read back, not retrained). ``--quick``: seed 0, 3 epochs, 120 test digits.
"""
from __future__ import annotations

import argparse
import time
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
from fastcert.train import read_metrics

VARIANTS = {
    "natural": ["method=natural"],
    "pgd": ["method=pgd"],
    "sabr_0.1": ["method=sabr", "method.lam=0.1"],
    "sabr_0.4": ["method=sabr", "method.lam=0.4"],
    "ibp": ["method=ibp"],
    "fast": ["method=fast"],
}
EPS = (0.1, 0.2)
CLAIM = ("Mao et al. 2024: IBP > SABR > PGD in tightness τ; larger ε, larger τ "
         "(digits, cnn_small)")


def overrides(variant: str, eps: float, seed: int, epochs: int, extra=()) -> list[str]:
    return ["data=digits", "model=cnn_small", *VARIANTS[variant], f"eps={eps}", f"seed={seed}",
            "optim.lr=1e-3", "eval.verifiers=[ibp,crown]", "device=cpu", "cpu_threads=1",
            *schedule(epochs), *extra]


def initial_tightness(cfg) -> float:
    """τ of the network a run with ``cfg`` starts from, on the run's probe batch."""
    from fastcert.pipeline import build
    from fastcert.settings import validate
    from fastcert.tightness import TightnessProbe

    settings = validate(cfg)
    built = build(settings, torch.device("cpu"))
    probe = TightnessProbe.on_held_out(built.data, settings.eps, built.device)
    return probe(built.net)["tightness"]


def run_one(variant: str, eps: float, seed: int, epochs: int, out: Path, extra=()) -> dict:
    """Train (or read back) one run; its τ curve from epoch 0 and its final accuracies."""
    args = overrides(variant, eps, seed, epochs, extra)
    run_dir = out / f"eps{eps:g}" / f"{variant}-s{seed}"
    results = train(args, run_dir, group="tightness_training")
    history = read_metrics(run_dir / "metrics.jsonl")
    curve = [initial_tightness(compose(args))] + [r["tightness"] for r in history]
    return {"variant": variant, "eps": eps, "seed": seed, "curve": curve,
            "clean_acc": results["clean_acc"], "ibp_verified_acc": results["ibp_verified_acc"],
            "crown_verified_acc": results["crown_verified_acc"]}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for eps in sorted({r["eps"] for r in runs}):
        for variant in VARIANTS:
            group = [r for r in runs if r["eps"] == eps and r["variant"] == variant]
            if not group:
                continue
            row = {"variant": variant, "eps": eps, "seeds": len(group)}
            for key, values in (("tau_init", [r["curve"][0] for r in group]),
                                ("tau_final", [r["curve"][-1] for r in group]),
                                ("clean_acc", [r["clean_acc"] for r in group]),
                                ("ibp_verified_acc", [r["ibp_verified_acc"] for r in group]),
                                ("crown_verified_acc", [r["crown_verified_acc"] for r in group])):
                row[key], row[f"{key}_std"] = mean_and_std(values)
            rows.append(row)
    return rows


def claims(summary: list[dict]) -> list[dict]:
    """The talk's orderings on the final τ (means over seeds): IBP > SABR (each λ) > PGD at each
    ε, IBP being vanilla ``ibp`` or ``fast`` (Shi et al.'s IBP, the baseline of the SABR paper),
    and τ(larger ε) > τ(smaller ε) for each certified-training variant."""
    tau = {(r["variant"], r["eps"]): r["tau_final"] for r in summary}
    epsilons = sorted({r["eps"] for r in summary})
    out = []
    for eps in epsilons:
        for ibp in ("ibp", "fast"):
            for sabr in ("sabr_0.1", "sabr_0.4"):
                if {(ibp, eps), (sabr, eps), ("pgd", eps)} <= tau.keys():
                    a, b, c = tau[(ibp, eps)], tau[(sabr, eps)], tau[("pgd", eps)]
                    out.append({"claim": f"{ibp} > SABR({sabr[5:]}) > PGD at eps={eps:g}",
                                "values": f"{a:.4f} > {b:.4f} > {c:.4f}", "held": a > b > c})
    for variant in ("ibp", "fast", "sabr_0.1", "sabr_0.4"):
        for lo, hi in zip(epsilons, epsilons[1:]):
            if {(variant, lo), (variant, hi)} <= tau.keys():
                a, b = tau[(variant, hi)], tau[(variant, lo)]
                out.append({"claim": f"{variant}: tau(eps={hi:g}) > tau(eps={lo:g})",
                            "values": f"{a:.4f} > {b:.4f}", "held": a > b})
    return out


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    epsilons = sorted({r["eps"] for r in runs})
    fig, axes = plt.subplots(1, len(epsilons), figsize=(6 * len(epsilons), 4.6), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for i, variant in enumerate(VARIANTS):
            curves = [r["curve"] for r in runs if r["eps"] == eps and r["variant"] == variant]
            if not curves:
                continue
            epochs = range(len(curves[0]))
            mean = [sum(c[e] for c in curves) / len(curves) for e in epochs]
            ax.plot(epochs, mean, color=f"C{i}", label=variant)
            if len(curves) > 1:
                ax.fill_between(epochs, [min(c[e] for c in curves) for e in epochs],
                                [max(c[e] for c in curves) for e in epochs], color=f"C{i}",
                                alpha=0.2)
        ax.set(yscale="log", xlabel="epoch (0: initialisation)",
               ylabel="propagation tightness τ (64 test digits)", title=f"ε = {eps:g}")
        ax.legend(fontsize=8)
    fig.suptitle(CLAIM + "; mean over seeds, band min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, "tightness_training", 36, "seed 0, 3 epochs, 120 test digits")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    seeds, epochs, extra = training_plan(args, 36)
    out = Path(args.out)
    t0 = time.perf_counter()
    runs = [run_one(v, eps, s, epochs, out, extra)
            for eps in args.eps for v in args.variants for s in seeds]
    summary = summarize(runs)
    checks = claims(summary)
    write_tables(out, {"curves": [{"variant": r["variant"], "eps": r["eps"], "seed": r["seed"],
                                   "epoch": e, "tau": t}
                                  for r in runs for e, t in enumerate(r["curve"])],
                       "summary": summary, "claims": checks})
    plot(runs, out / "tightness_training.png")
    print(f"\n{CLAIM}; {epochs} epochs, seeds {seeds}")
    print("| ε | variant | τ init | τ final | clean | IBP-verified | CROWN-verified |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for r in summary:
        print(f"| {r['eps']:g} | {r['variant']} | {r['tau_init']:.3g} | {r['tau_final']:.3g} ± "
              f"{r['tau_final_std']:.2g} | {100 * r['clean_acc']:.1f} | "
              f"{100 * r['ibp_verified_acc']:.1f} | {100 * r['crown_verified_acc']:.1f} |")
    print_claims(checks)
    print(f"{len(runs)} runs, {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return {"runs": runs, "summary": summary, "claims": checks}


if __name__ == "__main__":
    main()
