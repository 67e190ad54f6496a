"""Fig. 4.1 of Wang 2022 (thesis Sec. 4.3): final training error of IBP training vs width and ε.

    python -m experiments.ibp_convergence [--quick] [--data digits_2v5|mnist_2v5] [--out DIR]
        [--widths M ...] [--eps-a E E] [--widths-b M M] [--eps-b E ...] [--seeds S ...]
        [--epochs N] [--launcher joblib] [-- hydra overrides ...]

The thesis' experiment on a binary task (digits 2 vs 5 here; MNIST 2 vs 5 with
``--data mnist_2v5`` where the files are present): the two-layer ReLU net of Eq. 4.1 of width m
with the output signs fixed (``model=two_layer``), the logistic loss, SGD for 70 epochs, ε fixed
(presets ``experiment=wang2022/<data>/natural|ibp``, conf/setting/wang2022/). Each panel is one
or two Hydra multiruns of ``python -m fastcert.run -m`` (so ``--launcher joblib`` fans the jobs
out over a node's GPUs through fastcert.devices; the default launcher runs them one by one):

* (a) natural training and IBP at the two radii ``--eps-a``, for every width ``--widths``;
* (b) IBP at every radius ``--eps-b``, for the two widths ``--widths-b``.

The error plotted is the *training* error of the final model (the presets evaluate on the
training set): clean error for natural training, IBP-certified error (u̲ = lower bound of y·f
≤ 0) for IBP. Writes ``<out>/fig4_1a.png|csv``, ``<out>/fig4_1b.png|csv`` (mean ± std over
seeds), ``<out>/runs.csv`` (every run) and the runs under ``<out>/runs/``. ``--quick``: three
widths, three radii for (b), one seed, 8 epochs. Full: seeds 0, 1, 2. The digits' defaults:
widths 10 … 80,000, ε 0.1 and 0.3 for (a), widths 2000 and 5000 and ε 0.01 … 0.5 for (b)
(conf/setting/wang2022/digits_2v5.yaml has the optimiser and why).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sweep:
    """The grids of both panels."""

    widths: list[int]
    eps_a: list[float]
    widths_b: list[int]
    eps_b: list[float]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 70


WIDTHS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 80000]

#: Full sweeps per data set: the thesis' widths (up to 80,000) and, for (b), its widths 2000 and
#: 5000. MNIST: its radii 0.001 and 0.04. Digits (d = 64, not 784): radii where the behaviour
#: changes there (E‖w_r‖₁ is about 12x smaller, so the transition sits about 12x higher).
SWEEPS = {
    "digits_2v5": Sweep(WIDTHS, [0.1, 0.3], [2000, 5000],
                        [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]),
    "mnist_2v5": Sweep(WIDTHS, [0.001, 0.04], [2000, 5000],
                       [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1]),
}


def quick(sweep: Sweep) -> Sweep:
    """Three widths, three radii for (b), one seed, 8 epochs."""
    eps_b = [sweep.eps_b[1], sweep.eps_b[len(sweep.eps_b) // 2], sweep.eps_b[-1]]
    return Sweep([10, 100, 1000], list(sweep.eps_a), [100, 1000], eps_b, seeds=[0], epochs=8)


def _values(xs) -> str:
    return ",".join(repr(x) for x in xs)


def multiruns(data: str, sweep: Sweep) -> dict[str, list[str]]:
    """Hydra overrides of each multirun, by name (a_natural, a_ibp, b_ibp)."""
    common = [f"seed={_values(sweep.seeds)}", f"epochs={sweep.epochs}"]
    return {
        "a_natural": [f"experiment=wang2022/{data}/natural", f"model.m={_values(sweep.widths)}",
                      *common],
        "a_ibp": [f"experiment=wang2022/{data}/ibp", f"model.m={_values(sweep.widths)}",
                  f"eps={_values(sweep.eps_a)}", *common],
        "b_ibp": [f"experiment=wang2022/{data}/ibp", f"model.m={_values(sweep.widths_b)}",
                  f"eps={_values(sweep.eps_b)}", *common],
    }


def launch(name: str, overrides: list[str], runs: Path, extra: list[str]) -> Path:
    """``python -m fastcert.run -m <overrides>`` into ``runs/<name>`` (emptied first); its
    output goes to ``runs/<name>.log``."""
    sweep_dir = runs / name
    shutil.rmtree(sweep_dir, ignore_errors=True)
    sweep_dir.mkdir(parents=True)
    log = runs / f"{name}.log"
    cmd = [sys.executable, "-m", "fastcert.run", "-m", *overrides,
           f"hydra.sweep.dir={sweep_dir.resolve()}", *extra]
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"multirun {name} failed ({' '.join(cmd)}):\n{tail}")
    return sweep_dir


def collect(sweep_dir: Path, panel: str) -> list[dict]:
    """One row per finished run below ``sweep_dir``: its method, width, radius, seed and final
    training errors (the presets evaluate on the training set)."""
    from omegaconf import OmegaConf

    from fastcert.diagnostics import find_runs, read_run

    rows = []
    for path in find_runs(sweep_dir):
        results = read_run(path).results
        if results is None:
            continue
        cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
        clean = 1 - results["clean_acc"]
        ibp = 1 - results["ibp_verified_acc"]
        natural = results["method"] == "natural"
        rows.append({"panel": panel, "method": results["method"], "m": int(cfg.model.m),
                     "eps": results["train_eps"], "seed": results["seed"],
                     "train_error": clean if natural else ibp, "clean_train_error": clean,
                     "ibp_train_error": ibp, "pgd_train_error": 1 - results["pgd_acc"],
                     "n_train": results["n_test"], "wall_time_s": results["wall_time_s"]})
    return rows


def aggregate(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and std of ``train_error`` over seeds, per distinct ``keys``."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r["train_error"])
    out = []
    for key in sorted(groups):
        errors = groups[key]
        out.append({**dict(zip(keys, key)), "seeds": len(errors),
                    "train_error_mean": statistics.mean(errors),
                    "train_error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0})
    return out


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _series_label(row: dict) -> str:
    return "standard training" if row["method"] == "natural" else f"IBP, ε = {row['eps']:g}"


def plot_a(points: list[dict], path: Path, title: str) -> Path:
    """Final training error vs width: standard training (clean error) and IBP per radius
    (IBP-certified error), log-scaled width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = sorted({_series_label(p) for p in points}, key=lambda s: (s != "standard training", s))
    for label, marker in zip(labels, "osD^v"):
        ps = sorted((p for p in points if _series_label(p) == label), key=lambda p: p["m"])
        ax.errorbar([p["m"] for p in ps], [100 * p["train_error_mean"] for p in ps],
                    yerr=[100 * p["train_error_std"] for p in ps], marker=marker, capsize=3,
                    label=label + (" (IBP-certified error)" if label != "standard training" else
                                   " (clean error)"))
    ax.set_xscale("log")
    ax.set_xlabel("width m")
    ax.set_ylabel("final training error (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=9)
    ax.set_title(title)
    return _save(fig, path)


def plot_b(points: list[dict], path: Path, title: str) -> Path:
    """Final IBP-certified training error vs ε, one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, marker in zip(sorted({p["m"] for p in points}), "osD^v"):
        ps = sorted((p for p in points if p["m"] == m), key=lambda p: p["eps"])
        ax.errorbar([p["eps"] for p in ps], [100 * p["train_error_mean"] for p in ps],
                    yerr=[100 * p["train_error_std"] for p in ps], marker=marker, capsize=3,
                    label=f"IBP, width m = {m}")
    ax.set_xlabel("ε (L∞ radius, pixel units)")
    ax.set_ylabel("final IBP-certified training error (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9)
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _markdown(points: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " | train error (%) |",
             "|---" * (len(columns) + 1) + "|"]
    for p in points:
        err = f"{100 * p['train_error_mean']:.1f}"
        if p["seeds"] > 1:
            err += f" ± {100 * p['train_error_std']:.1f}"
        lines.append("| " + " | ".join(str(p[c]) for c in columns) + f" | {err} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few widths and radii, 8 epochs")
    p.add_argument("--data", default="digits_2v5", help="digits_2v5 or mnist_2v5 (presets "
                   "conf/experiment/wang2022/<data>/)")
    p.add_argument("--out", default="outputs/ibp_convergence")
    p.add_argument("--widths", type=int, nargs="+")
    p.add_argument("--eps-a", type=float, nargs=2)
    p.add_argument("--widths-b", type=int, nargs=2)
    p.add_argument("--eps-b", type=float, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--launcher", choices=["basic", "joblib"], default="basic",
                   help="joblib: parallel jobs over the node's GPUs (fastcert.devices)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.data not in SWEEPS:
        p.error(f"--data {args.data}: choose one of {', '.join(SWEEPS)}")
    sweep = quick(SWEEPS[args.data]) if args.quick else SWEEPS[args.data]
    sweep = replace(sweep, **{k: getattr(args, k) for k in ("widths", "eps_a", "widths_b",
                                                            "eps_b", "seeds", "epochs")
                              if getattr(args, k) is not None})
    out = Path(args.out)
    runs = out / "runs"
    extra = (["hydra/launcher=joblib"] if args.launcher == "joblib" else []) + args.overrides
    t0 = time.perf_counter()
    rows = []
    for name, overrides in multiruns(args.data, sweep).items():
        print(f"[ibp_convergence] multirun {name}: {' '.join(overrides)}", flush=True)
        rows += collect(launch(name, overrides, runs, extra), name[0])
    write_csv(out / "runs.csv", rows)
    a = aggregate([r for r in rows if r["panel"] == "a"], ("method", "eps", "m"))
    b = aggregate([r for r in rows if r["panel"] == "b"], ("m", "eps"))
    for point in a:  # natural training does not depend on ε
        if point["method"] == "natural":
            point["eps"] = 0.0
    data = args.data.replace("_2v5", " 2 vs 5")
    what = f"{data}, {sweep.epochs} epochs, seed{'s' if len(sweep.seeds) > 1 else ''} " + \
        ", ".join(map(str, sweep.seeds))
    plot_a(a, out / "fig4_1a.png", f"Fig. 4.1 (a): {what}")
    plot_b(b, out / "fig4_1b.png", f"Fig. 4.1 (b): {what}")
    write_csv(out / "fig4_1a.csv", a)
    write_csv(out / "fig4_1b.csv", b)
    print(f"\nFig. 4.1 (a), {what} ({time.perf_counter() - t0:.0f} s in all)\n")
    print(_markdown(a, ("method", "eps", "m")))
    print("\nFig. 4.1 (b)\n")
    print(_markdown(b, ("m", "eps")))
    return {"a": a, "b": b, "rows": rows}


if __name__ == "__main__":
    main()
