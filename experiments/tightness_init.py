"""Propagation tightness at initialisation against width and depth (Mao et al. ICLR 2024,
"Understanding certified training with interval bound propagation", Sec. 3; the talk's slides
"tightness decreases in squared root order of d" and "in exponential order of L").

    python -m experiments.tightness_init [--quick] [--draws N] [--out DIR]

Deep linear networks f = W_L … W_1 with i.i.d. N(0, 1) weights (input 64, output 10, every
hidden layer of width d; τ is scale-free, so the variance does not matter): τ per output is
|W_L…W_1| r / (|W_L|…|W_1| r) (:func:`fastcert.tightness.dln_tightness`, r = 1). The paper's
claims: τ = Θ(d^(-1/2)) for two layers, τ = O(d^(-⌊L/4⌋)) for depth L. For i.i.d. Gaussians
the expectations give τ ≈ √(π/(2d)) for two layers and ≈ (π/(2d))^((L-1)/2) for L layers
(E|N(0, d^(L-1))| over E|N(0, 1)|^L d^(L-1)), drawn as dotted lines.

The same sweep on ReLU networks at PyTorch's default initialisation (``fastcert.models.mlp``
with ``bn: none``, hidden widths [d] * (L-1)) measures τ with
:func:`fastcert.tightness.propagation_tightness` (the locally linear network at each input, the
margins y - j as outputs) on 64 digits at ε = 0.1.

Writes ``<out>/tightness_init.csv`` (per family, depth and width: mean, std and geometric mean
of τ over the draws, each draw averaged over its outputs and inputs), ``<out>/slopes.csv`` (the
fitted exponent of τ against d for two layers, and against L per width) and
``<out>/tightness_init.png``. ``--quick``: widths up to 1024, depths up to 6, 5 draws.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from experiments.science import digits, geomean, loglog_slope, mean_and_std, pyplot, write_csv
from fastcert.config import build_option
from fastcert.tightness import dln_tightness, propagation_tightness

INPUT, OUTPUT = 64, 10
EPS = 0.1
FULL = {"widths": [2 ** k for k in range(4, 13)], "depths": list(range(2, 11)),
        "depth_widths": [16, 64, 256], "draws": 20}
QUICK = {"widths": [2 ** k for k in range(4, 11)], "depths": list(range(2, 7)),
         "depth_widths": [16, 64], "draws": 5}
CLAIM = "Mao et al. 2024: τ = Θ(d^-1/2) for two layers, τ = O(d^-⌊L/4⌋) for depth L"


def dln_tau(depth: int, width: int, seed: int) -> float:
    """Mean τ over the outputs of one Gaussian DLN with ``depth`` matrices, hidden ``width``."""
    g = torch.Generator().manual_seed(seed)
    dims = [INPUT] + [width] * (depth - 1) + [OUTPUT]
    weights = [torch.randn(dims[k + 1], dims[k], generator=g, dtype=torch.float64)
               for k in range(depth)]
    return dln_tightness(weights).mean().item()


def relu_tau(depth: int, width: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean τ over inputs and margins of one ReLU MLP at PyTorch's default initialisation."""
    torch.manual_seed(seed)
    model = build_option("model", "mlp", {"bn": "none", "widths": [width] * (depth - 1)},
                         input_shape=(1, 8, 8), num_classes=OUTPUT)
    lower, upper = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    return propagation_tightness(model, x, y, lower, upper, OUTPUT).mean().item()


def dln_theory(depth: int, width: int) -> float:
    """(π/(2d))^((L-1)/2): the ratio of the expected optimal and layer-wise radii."""
    return (math.pi / (2 * width)) ** ((depth - 1) / 2)


def sweep(family: str, pairs, draws: int, x=None, y=None) -> list[dict]:
    """One row per (depth, width): τ over ``draws`` networks of ``family`` (dln / relu)."""
    rows = []
    for depth, width in pairs:
        taus = [dln_tau(depth, width, seed) if family == "dln" else
                relu_tau(depth, width, seed, x, y) for seed in range(draws)]
        mean, std = mean_and_std(taus)
        rows.append({"family": family, "depth": depth, "width": width, "draws": draws,
                     "tau_mean": mean, "tau_std": std, "tau_geomean": geomean(taus),
                     "dln_theory": dln_theory(depth, width)})
    return rows


def two_layer_exponent(widths, draws: int, family: str = "dln", x=None, y=None) -> float:
    """The fitted exponent a of τ ≈ c·d^a over two-layer networks of the given widths."""
    rows = sweep(family, [(2, w) for w in widths], draws, x, y)
    return loglog_slope([r["width"] for r in rows], [r["tau_geomean"] for r in rows])


def plot(rows: list[dict], slopes: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    fits = {(s["family"], s["versus"], s["width"]): s["exponent"] for s in slopes}
    for family, marker in (("dln", "o"), ("relu", "s")):
        two = [r for r in rows if r["family"] == family and r["depth"] == 2]
        label = "deep linear" if family == "dln" else "ReLU (default init)"
        ax1.errorbar([r["width"] for r in two], [r["tau_mean"] for r in two],
                     yerr=[r["tau_std"] for r in two], marker=marker, capsize=2,
                     label=f"{label}: fitted exponent {fits[(family, 'width', '')]:+.3f}")
    widths = sorted({r["width"] for r in rows if r["depth"] == 2})
    ax1.plot(widths, [dln_theory(2, w) for w in widths], "k:", label="√(π/(2d)) (slope −1/2)")
    ax1.set(xscale="log", yscale="log", xlabel="hidden width d", ylabel="tightness τ",
            title="two layers: τ against width")
    ax1.legend(fontsize=8)
    for (family, style) in (("dln", "-"), ("relu", "--")):
        for i, width in enumerate(sorted({r["width"] for r in rows if r["family"] == family
                                          and r["depth"] > 2})):
            deep = sorted((r for r in rows if r["family"] == family and r["width"] == width),
                          key=lambda r: r["depth"])
            ax2.plot([r["depth"] for r in deep], [r["tau_geomean"] for r in deep], style,
                     marker="o", color=f"C{i}",
                     label=f"{'DLN' if family == 'dln' else 'ReLU'} d={width}")
            if family == "dln":
                ax2.plot([r["depth"] for r in deep], [r["dln_theory"] for r in deep], ":",
                         color=f"C{i}")
    ax2.set(yscale="log", xlabel="depth L (weight matrices)", ylabel="tightness τ (geo. mean)",
            title="τ against depth (dotted: (π/(2d))^((L-1)/2))")
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Tightness at initialisation — {CLAIM}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="widths ≤ 1024, depths ≤ 6, 5 draws")
    p.add_argument("--draws", type=int, default=None, help="networks per point (20; quick 5)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="two-layer widths")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--depth-widths", type=int, nargs="+", default=None)
    p.add_argument("--out", default="outputs/tightness_init")
    args = p.parse_args(argv)
    grid = dict(QUICK if args.quick else FULL)
    for key in ("draws", "widths", "depths", "depth_widths"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    if min(grid["depths"]) < 2:
        p.error("--depths: a depth is at least 2 (one hidden layer)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    x, y = digits(64)
    pairs = ([(2, w) for w in grid["widths"]] +
             [(depth, w) for w in grid["depth_widths"] for depth in grid["depths"] if depth > 2])
    rows = sweep("dln", pairs, grid["draws"]) + sweep("relu", pairs, grid["draws"], x, y)
    slopes = []
    for family in ("dln", "relu"):
        two = [r for r in rows if r["family"] == family and r["depth"] == 2]
        slopes.append({"family": family, "versus": "width", "width": "",
                       "exponent": loglog_slope([r["width"] for r in two],
                                                [r["tau_geomean"] for r in two]),
                       "paper": "-0.5 (Θ(d^-1/2), two layers)"})
        for width in grid["depth_widths"]:
            deep = [r for r in rows if r["family"] == family and r["width"] == width]
            # τ ≈ c·d^(-a·L): the slope of ln τ against L, in units of ln d
            lx = [r["depth"] for r in deep]
            ly = [math.log(r["tau_geomean"]) / math.log(width) for r in deep]
            mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
            slope = (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
                     / sum((a - mx) ** 2 for a in lx))
            slopes.append({"family": family, "versus": "depth", "width": width,
                           "exponent": slope,
                           "paper": "≤ -1/4 per layer in log_d τ (O(d^-⌊L/4⌋))"})
    out = Path(args.out)
    write_csv(out / "tightness_init.csv", rows)
    write_csv(out / "slopes.csv", slopes)
    plot(rows, slopes, out / "tightness_init.png")
    for s in slopes:
        where = "two layers, vs width" if s["versus"] == "width" else f"d={s['width']}, vs depth"
        unit = "" if s["versus"] == "width" else " (d-exponent per layer)"
        print(f"{s['family']:5s} {where:22s} fitted exponent {s['exponent']:+.3f}{unit}")
    print(f"{time.perf_counter() - t0:.1f} s; wrote {out}/tightness_init.csv, slopes.csv, "
          f"tightness_init.png")
    return {"rows": rows, "slopes": slopes}


if __name__ == "__main__":
    main()
