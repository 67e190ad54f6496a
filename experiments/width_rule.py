"""The width-scale rule on the digits: certified and clean accuracy and tightness against width
and against added depth at equal parameter count, for IBP and SABR (Mao et al. ICLR 2024,
Sec. 3-5; the talk's slides "Width brings less regularization than depth" and "Width-scale
Rule Predicts Better Models").

    python -m experiments.width_rule [--quick] [--seeds 0 1 2] [--eps E] [--epochs N]
                                     [--out DIR] [overrides ...]

The network is the fully connected ``mlp`` (``bn: full``), whose ``widths`` key sets both
width and depth. Width series: two hidden layers of 128·m units for m = 0.5, 1, 2, 4. Depth
series: hidden layers of 128 units, as many as make the parameter count closest to each member
of the width series (1, 2, 6, 18 layers: 10k, 27k, 94k, 295k parameters against 9k, 27k, 86k,
303k; at 1× both series are the same network, trained once). Methods: ``fast`` (IBP with IBP
initialisation and the warmup regularisers of Shi et al. 2021, the IBP baseline of the SABR and
TAPS papers) and ``sabr`` (λ = 0.4), each trained with the schedule of
``experiments.compare_methods`` (``--epochs`` 36) at ε = ``--eps`` (0.1).

The claims tested: at initialisation τ falls far faster with depth than with width
(τ = Θ(d^(-1/2)) against exponential in L), and widening (not deepening) improves certified
accuracy. Writes ``<out>/width_rule.csv`` (every run: series, m, hidden layers, width,
parameters, method, seed, τ at init and at the end, clean, IBP-, CROWN- and any-verified
accuracy), ``<out>/summary.csv`` (mean ± std over seeds), ``<out>/claims.csv`` and
``<out>/width_rule.png``; the runs under ``<out>/<method>/<layers>x<width>-s<seed>/``.
``--quick``: seed 0, 3 epochs, multipliers 0.5 and 2 only, 120 test digits.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

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
from experiments.tightness_training import initial_tightness
from fastcert.config import build_option
from fastcert.train import read_metrics

#: Hidden width of the depth series, and of the width series at multiplier 1.
BASE = 128
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
METHODS = ("fast", "sabr")
CLAIM = ("Mao et al. 2024: width brings less regularisation than depth; "
         "wider (not deeper) networks certify more")


def parameters(widths) -> int:
    model = build_option("model", "mlp", {"widths": list(widths)}, input_shape=(1, 8, 8),
                         num_classes=10)
    return sum(p.numel() for p in model.parameters())


def architectures(multipliers=MULTIPLIERS) -> list[dict]:
    """The width series and, for each of its members, the depth series' network of width
    :data:`BASE` whose parameter count is closest to it."""
    archs = []
    for m in multipliers:
        wide = [int(BASE * m)] * 2
        target = parameters(wide)
        depth = min(range(1, 40), key=lambda n: abs(parameters([BASE] * n) - target))
        archs.append({"series": "width", "m": m, "widths": wide, "params": target})
        archs.append({"series": "depth", "m": m, "widths": [BASE] * depth,
                      "params": parameters([BASE] * depth)})
    return archs


def overrides(arch: dict, method: str, eps: float, seed: int, epochs: int, extra=()) -> list[str]:
    widths = ",".join(str(w) for w in arch["widths"])
    return ["data=digits", "model=mlp", f"model.widths=[{widths}]", f"method={method}",
            f"eps={eps}", f"seed={seed}", "optim.lr=1e-3", "eval.verifiers=[ibp,crown]",
            "device=cpu", "cpu_threads=1", *schedule(epochs), *extra]


def run_one(arch: dict, method: str, eps: float, seed: int, epochs: int, out: Path,
            extra=()) -> dict:
    args = overrides(arch, method, eps, seed, epochs, extra)
    run_dir = out / method / f"{len(arch['widths'])}x{arch['widths'][0]}-s{seed}"
    results = train(args, run_dir, group="width_rule")
    history = read_metrics(run_dir / "metrics.jsonl")
    return {"series": arch["series"], "m": arch["m"], "hidden_layers": len(arch["widths"]),
            "width": arch["widths"][0], "params": arch["params"], "method": method,
            "seed": seed, "tau_init": initial_tightness(compose(args)),
            "tau_final": history[-1]["tightness"], "clean_acc": results["clean_acc"],
            "ibp_verified_acc": results["ibp_verified_acc"],
            "crown_verified_acc": results["crown_verified_acc"],
            "any_verified_acc": results["any_verified_acc"]}


KEYS = ("tau_init", "tau_final", "clean_acc", "ibp_verified_acc", "crown_verified_acc",
        "any_verified_acc")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for series in ("width", "depth"):
            for m in sorted({r["m"] for r in rows}):
                group = [r for r in rows if (r["method"], r["series"], r["m"]) ==
                         (method, series, m)]
                if not group:
                    continue
                row = {k: group[0][k] for k in ("method", "series", "m", "hidden_layers",
                                                 "width", "params")}
                row["seeds"] = len(group)
                for key in KEYS:
                    row[key], row[f"{key}_std"] = mean_and_std(r[key] for r in group)
                out.append(row)
    return out


def claims(summary: list[dict]) -> list[dict]:
    """Per method: at each parameter budget above the smallest, the wide network's τ at init is
    above the deep one's, and its certified (any-verified) accuracy too; and certified accuracy
    at the largest width is above that at 1×."""
    get = {(r["method"], r["series"], r["m"]): r for r in summary}
    ms = sorted({r["m"] for r in summary})
    out = []
    for method in dict.fromkeys(r["method"] for r in summary):
        for m in ms[1:]:
            w, d = get.get((method, "width", m)), get.get((method, "depth", m))
            if w is None or d is None or w["hidden_layers"] == d["hidden_layers"]:
                continue
            out.append({"claim": f"{method}, ~{w['params'] // 1000}k params: tau at init, "
                                 f"wide > deep", "values":
                        f"{w['tau_init']:.3g} > {d['tau_init']:.3g}",
                        "held": w["tau_init"] > d["tau_init"]})
            out.append({"claim": f"{method}, ~{w['params'] // 1000}k params: certified, "
                                 f"wide > deep", "values":
                        f"{100 * w['any_verified_acc']:.1f} > {100 * d['any_verified_acc']:.1f}",
                        "held": w["any_verified_acc"] > d["any_verified_acc"]})
        if (method, "width", 1.0) in get and ms[-1] > 1.0:
            big, one = get[(method, "width", ms[-1])], get[(method, "width", 1.0)]
            out.append({"claim": f"{method}: certified at width {ms[-1]:g}x > at 1x", "values":
                        f"{100 * big['any_verified_acc']:.1f} > "
                        f"{100 * one['any_verified_acc']:.1f}",
                        "held": big["any_verified_acc"] > one["any_verified_acc"]})
    return out


def plot(summary: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = (("any_verified_acc", "certified (IBP or CROWN) %", 100),
              ("clean_acc", "clean %", 100), ("tau_final", "τ after training", 1))
    for ax, (key, label, scale) in zip(axes, panels):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in summary)):
            for series, style in (("width", "-o"), ("depth", "--s")):
                rows = [r for r in summary if r["method"] == method and r["series"] == series]
                ax.errorbar([r["params"] for r in rows], [scale * r[key] for r in rows],
                            yerr=[scale * r[f"{key}_std"] for r in rows], fmt=style,
                            color=f"C{i}", capsize=2,
                            label=f"{'IBP (fast)' if method == 'fast' else method}: "
                                  f"{'wider' if series == 'width' else 'deeper'}")
        ax.set(xscale="log", xlabel="parameters", ylabel=label)
        ax.legend(fontsize=7)
    for r in summary:
        if r["method"] == summary[0]["method"]:
            axes[0].annotate(f"{r['hidden_layers']}×{r['width']}",
                             (r["params"], 100 * r["any_verified_acc"]), fontsize=6)
    fig.suptitle(CLAIM + " (digits mlp; labels: hidden layers × width)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, "width_rule", 36, "seed 0, 3 epochs, m = 0.5 and 2")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--multipliers", type=float, nargs="+", default=None)
    args = p.parse_args(argv)
    multipliers = args.multipliers or ([0.5, 2.0] if args.quick else list(MULTIPLIERS))
    if min(multipliers) * BASE < 1:
        p.error(f"--multipliers: each times {BASE} must be at least one unit")
    seeds, epochs, extra = training_plan(args, 36)
    out = Path(args.out)
    t0 = time.perf_counter()
    archs = architectures(multipliers)
    rows = [run_one(a, method, args.eps, s, epochs, out, extra)
            for method in args.methods for a in archs for s in seeds]
    summary = summarize(rows)
    checks = claims(summary)
    write_tables(out, {"width_rule": rows, "summary": summary, "claims": checks})
    plot(summary, out / "width_rule.png")
    print(f"\n{CLAIM}; digits, eps={args.eps:g}, {epochs} epochs, seeds {seeds}")
    print("| method | series | m | layers × width | params | τ init | τ final | clean | "
          "certified |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in summary:
        print(f"| {r['method']} | {r['series']} | {r['m']:g} | {r['hidden_layers']}×{r['width']} "
              f"| {r['params']} | {r['tau_init']:.3g} | {r['tau_final']:.3g} | "
              f"{100 * r['clean_acc']:.1f} ± {100 * r['clean_acc_std']:.1f} | "
              f"{100 * r['any_verified_acc']:.1f} ± {100 * r['any_verified_acc_std']:.1f} |")
    print_claims(checks)
    print(f"{len(rows)} runs, {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return {"rows": rows, "summary": summary, "claims": checks}


if __name__ == "__main__":
    main()
