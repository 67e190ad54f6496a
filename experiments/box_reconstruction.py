"""Box reconstruction error of PCA weights against the intrinsic dimension (Mao et al. ICLR
2024, "Understanding certified training with interval bound propagation"; the talk's slide "Box
Reconstruction Error": for linearly separable data, PCA (optimal) weights give a layer-wise box
growing linearly and an optimal box growing like √ of the intrinsic dimension).

    python -m experiments.box_reconstruction [--quick] [--draws N] [--out DIR]

Synthetic data (as in the authors' embedding experiment): N points in R^D lying on a random
k-dimensional linear subspace (an orthonormal basis U, D×k, from the QR of a Gaussian matrix;
coordinates Z ~ N(0, diag(s)) with distinct variances s so that PCA's axes are defined), so the
data are recovered exactly by a linear map. The two-layer linear autoencoder D → k → D with PCA
weights (W1 = Vᵀ, W2 = V, V the top-k principal directions of the centred data) reconstructs
every point exactly: the optimal weights. For an input box of radius ε its output boxes have
half-widths (per unit ε, mean over the D outputs; :func:`fastcert.tightness.dln_box_radii`)

    layer-wise (IBP)  |V| |Vᵀ| 1   ≈ (2/π)·k        (linear in k)
    optimal           |V Vᵀ| 1     ≈ √(2k/π) + k/D  (√k for 1 ≪ k ≪ D)

and τ = optimal / layer-wise ≈ 1/√k. Writes ``<out>/box_reconstruction.csv`` (per k: mean
± std over the draws of both radii, τ, and the largest reconstruction error of the data),
``<out>/slopes.csv`` (fitted exponents of both radii and of τ against k) and
``<out>/box_reconstruction.png``. Full: D = 1024, k = 1 … 128, 10 draws; ``--quick``: D = 256,
k = 1 … 32, 3 draws.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from experiments.science import loglog_slope, mean_and_std, pyplot, write_csv
from fastcert.tightness import dln_box_radii

FULL = {"ambient": 1024, "dims": [1, 2, 4, 8, 16, 32, 64, 128], "draws": 10}
QUICK = {"ambient": 256, "dims": [1, 2, 4, 8, 16, 32], "draws": 3}
CLAIM = ("Mao et al. 2024: PCA (optimal) weights — layer-wise box grows linearly, "
         "optimal box like √k in the intrinsic dimension k")


def pca_autoencoder(ambient: int, dim: int, seed: int, points: int | None = None):
    """(data X (N, D), W1 = Vᵀ (k, D), W2 = V (D, k)) for one draw of the synthetic data."""
    g = torch.Generator().manual_seed(seed)
    points = points or 2 * ambient
    basis, _ = torch.linalg.qr(torch.randn(ambient, dim, generator=g, dtype=torch.float64))
    scales = torch.linspace(2.0, 1.0, dim, dtype=torch.float64)  # distinct: PCA axes defined
    x = (torch.randn(points, dim, generator=g, dtype=torch.float64) * scales) @ basis.T
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh[:dim].T
    return x, v.T.contiguous(), v.contiguous()


def measure(ambient: int, dim: int, seed: int) -> dict:
    """Both radii per unit ε (mean over outputs), τ, and the reconstruction error of one draw."""
    x, w1, w2 = pca_autoencoder(ambient, dim, seed)
    optimal, layerwise = dln_box_radii([w1, w2])
    centre = x.mean(0)
    error = ((x - centre) @ w1.T @ w2.T + centre - x).abs().max().item()
    return {"optimal": optimal.mean().item(), "layerwise": layerwise.mean().item(),
            "tau": (optimal / layerwise).mean().item(), "error": error}


def sweep(ambient: int, dims, draws: int) -> list[dict]:
    rows = []
    for dim in dims:
        draws_ = [measure(ambient, dim, seed) for seed in range(draws)]
        row = {"ambient_dim": ambient, "intrinsic_dim": dim, "draws": draws}
        for key in ("layerwise", "optimal", "tau"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_and_std(d[key] for d in draws_)
        row["layerwise_theory"] = 2 / math.pi * dim
        row["optimal_theory"] = math.sqrt(2 * dim / math.pi) + dim / ambient
        row["max_reconstruction_error"] = max(d["error"] for d in draws_)
        rows.append(row)
    return rows


def exponents(rows: list[dict]) -> dict[str, float]:
    """Fitted exponents a of c·k^a for both radii and τ (k ≥ 2: at k = 1 both radii are the
    same number, |v| |v|ᵀ 1 = |v vᵀ| 1)."""
    fit = [r for r in rows if r["intrinsic_dim"] >= 2]
    ks = [r["intrinsic_dim"] for r in fit]
    return {key: loglog_slope(ks, [r[f"{key}_mean"] for r in fit])
            for key in ("layerwise", "optimal", "tau")}


def plot(rows: list[dict], slopes: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ks = [r["intrinsic_dim"] for r in rows]
    for key, label, marker in (("layerwise", "layer-wise (IBP) box", "o"),
                               ("optimal", "optimal box", "s")):
        ax1.errorbar(ks, [r[f"{key}_mean"] for r in rows], yerr=[r[f"{key}_std"] for r in rows],
                     marker=marker, capsize=2,
                     label=f"{label}: fitted exponent {slopes[key]:.3f}")
    ax1.plot(ks, [r["layerwise_theory"] for r in rows], "k:", label="(2/π)·k")
    ax1.plot(ks, [r["optimal_theory"] for r in rows], "k--", label="√(2k/π) + k/D")
    ax1.set(xscale="log", yscale="log", xlabel="intrinsic dimension k",
            ylabel="output box half-width per unit ε (mean over outputs)",
            title=f"PCA autoencoder D={rows[0]['ambient_dim']} → k → D")
    ax1.legend(fontsize=8)
    ax2.errorbar(ks, [r["tau_mean"] for r in rows], yerr=[r["tau_std"] for r in rows],
                 marker="o", capsize=2, label=f"τ: fitted exponent {slopes['tau']:.3f}")
    ax2.plot(ks, [math.sqrt(math.pi / (2 * k)) for k in ks], "k:", label="√(π/(2k))")
    ax2.set(xscale="log", yscale="log", xlabel="intrinsic dimension k", ylabel="tightness τ",
            title="optimal / layer-wise")
    ax2.legend(fontsize=8)
    fig.suptitle(CLAIM, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="D = 256, k ≤ 32, 3 draws")
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--ambient", type=int, default=None, help="ambient dimension D")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="intrinsic dimensions k")
    p.add_argument("--out", default="outputs/box_reconstruction")
    args = p.parse_args(argv)
    grid = dict(QUICK if args.quick else FULL)
    for key, value in (("draws", args.draws), ("ambient", args.ambient), ("dims", args.dims)):
        if value is not None:
            grid[key] = value
    if not all(1 <= k <= grid["ambient"] for k in grid["dims"]) or len(grid["dims"]) < 3:
        p.error(f"--dims: at least three intrinsic dimensions in 1..{grid['ambient']} (the "
                f"ambient dimension)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = sweep(grid["ambient"], grid["dims"], grid["draws"])
    slopes = exponents(rows)
    out = Path(args.out)
    write_csv(out / "box_reconstruction.csv", rows)
    write_csv(out / "slopes.csv", [
        {"quantity": "layerwise", "exponent": slopes["layerwise"], "paper": "1 (linear)"},
        {"quantity": "optimal", "exponent": slopes["optimal"], "paper": "0.5 (square root)"},
        {"quantity": "tau", "exponent": slopes["tau"], "paper": "-0.5"}])
    plot(rows, slopes, out / "box_reconstruction.png")
    for r in rows:
        print(f"k={r['intrinsic_dim']:4d}  layer-wise {r['layerwise_mean']:8.3f}  optimal "
              f"{r['optimal_mean']:7.3f}  τ {r['tau_mean']:.4f}")
    print("fitted exponents: " + ", ".join(f"{k} {v:.3f}" for k, v in slopes.items()))
    print(f"{time.perf_counter() - t0:.1f} s; wrote {out}/box_reconstruction.csv, slopes.csv, "
          f"box_reconstruction.png")
    return {"rows": rows, "slopes": slopes}


if __name__ == "__main__":
    main()
