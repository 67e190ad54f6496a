"""Diagnostic plots of training runs (Shi et al. 2021, Figs. 1-4) and of certification.

``python -m fastcert.plots RUN_DIR [RUN_DIR ...] [--out PATH]`` draws, from each run's
``metrics.jsonl`` (one record per epoch, written by :func:`fastcert.train.fit`), into
``RUN_DIR/plots/``:

* ``training_curves.png`` — loss (total, natural, robust), ε and train clean / verified
  accuracy vs epoch;
* ``relu_states.png`` — fraction of active (h̲ ≥ 0), inactive (h̄ ≤ 0) and unstable ReLU
  neurons per layer vs epoch (Fig. 2 of Shi et al. 2021; absent for natural training);
* ``regularizers.png`` — L_tightness (Eq. 7) and L_relu (Eq. 8) vs epoch (Figs. 3-4; logged by
  the ``ibp`` and ``fast`` methods);
* ``tightness.png`` — propagation tightness τ (Mao et al. 2024; :mod:`fastcert.tightness`)
  on a fixed test batch at the training ε vs epoch;
* ``certify.png`` — accuracies vs ε from ``RUN_DIR/certify/certify.json`` when present.

With several runs it also draws ``clean_vs_verified.png`` (clean vs verified test accuracy
from each ``results.json``: ``any_verified_acc``, else ``ibp_verified_acc``) into ``--out``
(a directory or a ``.png`` path; default ``plots/`` in the runs' common folder: nothing is
ever written into the current directory), and ``tightness.png`` beside it (every run's τ vs
epoch on one axis). A RUN_DIR without metrics.jsonl
or results.json is searched for runs below it (a Hydra multirun folder).

``python -m fastcert.plots --bound-explosion OUT.png`` draws Fig. 1: Ê(Δ_i) per layer of an
untrained CNN under each initialiser (:func:`fastcert.diagnostics.bound_explosion`).

Every ``plot_*`` function returns ``(path written, data plotted)`` (or ``None`` when the run
has nothing to plot), the data as ``{series name: {"epoch": [...], "value": [...]}}`` taken
verbatim from the records, so tests can compare it with metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fastcert.diagnostics import RunRecord, bound_explosion, find_runs, read_run, series  # noqa: E402

Plotted = tuple[Path, dict]

LOSS_KEYS = ("loss", "loss/natural", "loss/robust")
ACC_KEYS = ("train_clean_acc", "train_verified_acc")
RELU_KEYS = ("relu_active", "relu_inactive", "relu_unstable")
REG_KEYS = ("reg/tightness", "reg/relu")
LABELS = {"loss": "total loss", "loss/natural": "natural CE", "loss/robust": "robust CE",
          "eps": "ε (end of epoch)", "train_clean_acc": "train clean acc.",
          "train_verified_acc": "train verified acc.", "relu_active": "active",
          "relu_inactive": "inactive", "relu_unstable": "unstable",
          "reg/tightness": "L_tightness (Eq. 7)", "reg/relu": "L_relu (Eq. 8)",
          "lambda": "λ (regulariser weight)", "tightness": "propagation tightness τ"}


def _collect(metrics: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        epochs, values = series(metrics, k)
        if epochs:
            out[k] = {"epoch": epochs, "value": values}
    return out


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _positive(values) -> bool:
    return all(v is not None and v > 0 for v in values)


# --------------------------------------------------------------------------- per run


def plot_training_curves(metrics: list[dict], path: Path, title: str = "") -> Plotted | None:
    """Loss, ε and train clean/verified accuracy vs epoch."""
    data = _collect(metrics, LOSS_KEYS + ("eps",) + ACC_KEYS)
    if not data:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for k in LOSS_KEYS:
        if k in data:
            ax.plot(data[k]["epoch"], data[k]["value"], marker=".", label=LABELS[k])
    if all(_positive(data[k]["value"]) for k in LOSS_KEYS if k in data):
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="loss")
    ax = axes[1]
    if "eps" in data:
        ax.plot(data["eps"]["epoch"], data["eps"]["value"], marker=".", color="C3",
                label=LABELS["eps"])
    ax.set(xlabel="epoch", ylabel="ε (pixel units)", title="ε schedule")
    ax = axes[2]
    for k in ACC_KEYS:
        if k in data:
            ax.plot(data[k]["epoch"], data[k]["value"], marker=".", label=LABELS[k])
    ax.set(xlabel="epoch", ylabel="accuracy", title="training accuracy", ylim=(-0.02, 1.02))
    for ax in axes:
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path), data


def plot_relu_states(metrics: list[dict], path: Path, title: str = "") -> Plotted | None:
    """Active / inactive / unstable ReLU fractions per layer vs epoch (Fig. 2 of Shi et al.
    2021). ``value`` holds one list per epoch with one fraction per ReLU layer."""
    data = _collect(metrics, RELU_KEYS)
    if not data:
        return None
    fig, axes = plt.subplots(1, len(RELU_KEYS), figsize=(15, 4), sharey=True)
    for ax, k in zip(axes, RELU_KEYS):
        if k in data:
            epochs, rows = data[k]["epoch"], data[k]["value"]
            for layer in range(max(len(r) for r in rows)):
                ax.plot(epochs, [r[layer] if layer < len(r) else float("nan") for r in rows],
                        marker=".", label=f"layer {layer + 1}")
            ax.legend(fontsize="small")
        ax.set(xlabel="epoch", ylabel=f"fraction of {LABELS[k]} neurons",
               title=f"{LABELS[k]} ReLUs", ylim=(-0.02, 1.02))
    if title:
        fig.suptitle(title)
    return _save(fig, path), data


def plot_regularizers(metrics: list[dict], path: Path, title: str = "") -> Plotted | None:
    """L_tightness and L_relu vs epoch (Figs. 3-4 of Shi et al. 2021), and λ when logged."""
    data = _collect(metrics, REG_KEYS + ("lambda",))
    if not any(k in data for k in REG_KEYS):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k in zip(axes, REG_KEYS):
        if k in data:
            ax.plot(data[k]["epoch"], data[k]["value"], marker=".", label=LABELS[k])
        if "lambda" in data:
            twin = ax.twinx()
            twin.plot(data["lambda"]["epoch"], data["lambda"]["value"], color="gray",
                      linestyle="--", label=LABELS["lambda"])
            twin.set_ylabel("λ")
            handles = ax.get_legend_handles_labels()
            extra = twin.get_legend_handles_labels()
            ax.legend(handles[0] + extra[0], handles[1] + extra[1])
        elif ax.lines:
            ax.legend()
        ax.set(xlabel="epoch", ylabel=LABELS[k], title=LABELS[k])
    if title:
        fig.suptitle(title)
    return _save(fig, path), data


def plot_tightness(metrics: list[dict], path: Path, title: str = "") -> Plotted | None:
    """Propagation tightness τ vs epoch (log scale: PGD-trained networks sit near 1e-3, IBP-
    trained ones near 1; Mao et al. 2024)."""
    data = _collect(metrics, ("tightness",))
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(data["tightness"]["epoch"], data["tightness"]["value"], marker=".")
    _tightness_axes(ax, data["tightness"]["value"], title)
    return _save(fig, path), data


def _tightness_axes(ax, values, title: str) -> None:
    if _positive(values):
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel=LABELS["tightness"],
           title=title or "propagation tightness (test batch, training ε)")


def plot_certify(certify_json: Path, path: Path, title: str = "") -> Plotted | None:
    """Accuracies vs ε from a certify.json (:mod:`fastcert.certify`); skipped verifiers are
    left out. ``data`` = {"eps": [...], key: [...]} for clean, pgd, the verifiers and any."""
    if not Path(certify_json).is_file():
        return None
    summary = json.loads(Path(certify_json).read_text())
    rows = sorted(summary["results"], key=lambda r: r["eps"])
    if not rows:
        return None
    data = {"eps": [r["eps"] for r in rows]}
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"clean": "clean", "pgd": "PGD", "ibp": "IBP-verified",
             "crown_ibp": "CROWN-IBP-verified", "crown": "CROWN-verified",
             "any": "verified by any"}
    for k, label in names.items():
        values = [r.get(k) for r in rows]
        if all(v is None for v in values):
            continue
        data[k] = values
        ax.plot(data["eps"], [float("nan") if v is None else v for v in values], marker="o",
                label=label)
    ax.set(xlabel="ε (pixel units)", ylabel="test accuracy", ylim=(-0.02, 1.02),
           title=title or "certified accuracy vs ε")
    ax.legend()
    return _save(fig, path), data


def plot_run(run: str | Path | RunRecord, out_dir: str | Path | None = None
             ) -> dict[str, Plotted]:
    """Every per-run figure into ``out_dir`` (default ``RUN_DIR/plots``); returns
    {figure name: (path, data)} for the figures the run has data for."""
    rec = run if isinstance(run, RunRecord) else read_run(run)
    out_dir = Path(out_dir) if out_dir is not None else rec.path / "plots"
    title = rec.label
    out = {}
    for name, fn in (("training_curves", plot_training_curves),
                     ("relu_states", plot_relu_states),
                     ("regularizers", plot_regularizers),
                     ("tightness", plot_tightness)):
        res = fn(rec.metrics, out_dir / f"{name}.png", title)
        if res is not None:
            out[name] = res
    res = plot_certify(rec.path / "certify" / "certify.json", out_dir / "certify.png", title)
    if res is not None:
        out["certify"] = res
    return out


# --------------------------------------------------------------------------- across runs


def verified_key(results: dict) -> str | None:
    """The verified accuracy a scatter shows: any_verified_acc, else the first verifier's."""
    for k in ("any_verified_acc", "ibp_verified_acc", "crown_verified_acc"):
        if results.get(k) is not None:
            return k
    return None


def plot_accuracy_scatter(runs: list[RunRecord], path: Path) -> Plotted | None:
    """Clean vs verified test accuracy, one point per run with a results.json, coloured by
    method (the trade-off plot of Zhang et al. 2020, Fig. 2). ``data`` = {"points": [...]}."""
    points = []
    for rec in runs:
        r = rec.results or {}
        key = verified_key(r)
        if key is None or r.get("clean_acc") is None:
            continue
        points.append({"run": rec.label, "path": str(rec.path), "method": r.get("method", "?"),
                       "eps": r.get("eps"), "clean": r["clean_acc"], "verified": r[key],
                       "verified_key": key})
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    methods = sorted({p["method"] for p in points})
    for i, m in enumerate(methods):
        pts = [p for p in points if p["method"] == m]
        ax.scatter([p["clean"] for p in pts], [p["verified"] for p in pts], color=f"C{i}",
                   label=m, s=40)
        for p in pts:
            tag = p["run"] if p["eps"] is None else f"{p['run']} ε={p['eps']:.3g}"
            ax.annotate(tag, (p["clean"], p["verified"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.5, linestyle=":", label="verified = clean")
    keys = sorted({p["verified_key"] for p in points})
    ax.set(xlabel="clean test accuracy", ylabel=f"verified test accuracy ({', '.join(keys)})",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="clean vs verified accuracy")
    ax.legend(title="method")
    return _save(fig, path), {"points": points}


def plot_tightness_runs(runs: list[RunRecord], path: Path) -> Plotted | None:
    """Every run's τ vs epoch on one axis (e.g. the methods of a comparison)."""
    data = {rec.label: s for rec in runs
            for s in [_collect(rec.metrics, ("tightness",)).get("tightness")] if s}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in data.items():
        ax.plot(s["epoch"], s["value"], marker=".", label=label)
    _tightness_axes(ax, [v for s in data.values() for v in s["value"]], "")
    ax.legend(fontsize="small")
    return _save(fig, path), data


def plot_bound_explosion(path: Path, data: dict | None = None, **kwargs) -> Plotted:
    """Fig. 1 of Shi et al. 2021: Ê(Δ_i) (log scale) per layer for each initialiser.
    ``data`` defaults to :func:`fastcert.diagnostics.bound_explosion` (``**kwargs``)."""
    data = bound_explosion(**kwargs) if data is None else data
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = list(range(len(data["layers"])))
    # varied markers and line styles keep coinciding curves visible (PyTorch's default init
    # is xavier_uniform's U(±1/√n))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for i, (name, widths) in enumerate(data["mean_width"].items()):
        marker, line = styles[i % len(styles)]
        ax.plot(layers, widths, marker=marker, linestyle=line, label=name)
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xticklabels(["input"] + [str(i) for i in layers[1:]])
    s = data["settings"]
    ax.set(xlabel="layer i (ReLU input; 0 = input box)",
           ylabel="Ê(Δ_i): mean IBP bound width (log scale)",
           title=f"bound explosion at init: {s['model']} (width {s['width']}, BN {s['bn']}), "
                 f"ε={s['eps']:.3g}")
    ax.legend(title="initialisation", fontsize="small")
    return _save(fig, path), data


# --------------------------------------------------------------------------- CLI


def _scatter_path(out: str | None, run_dirs: list) -> Path:
    """``--out`` (a directory or a .png path), else ``plots/`` in the runs' common folder
    (e.g. the multirun dir): never the current directory."""
    if out is None:
        common = Path(os.path.commonpath([str(Path(d).resolve()) for d in run_dirs]))
        return common / "plots" / "clean_vs_verified.png"
    p = Path(out)
    return p if p.suffix.lower() == ".png" else p / "clean_vs_verified.png"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m fastcert.plots",
        description="Plot training runs (metrics.jsonl / results.json) and Fig. 1 of Shi et "
                    "al. 2021. Per-run figures go to RUN_DIR/plots/.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run directories (or folders holding runs, e.g. a multirun dir)")
    parser.add_argument("--out", default=None,
                        help="where the clean-vs-verified scatter of several runs goes: a "
                             "directory or a .png path (default: plots/ in the runs' common "
                             "folder)")
    parser.add_argument("--bound-explosion", metavar="OUT.png", default=None,
                        help="draw the bound-explosion figure (Fig. 1) to OUT.png")
    parser.add_argument("--be-model", default="cnn7", help="model for --bound-explosion")
    parser.add_argument("--be-width", type=float, default=1.0, help="its width multiplier")
    parser.add_argument("--be-size", type=int, default=32, help="input size (3xSxS)")
    parser.add_argument("--be-batch", type=int, default=4, help="random inputs per init")
    parser.add_argument("--be-eps", type=float, default=8 / 255, help="ε (pixel units)")
    args = parser.parse_args(argv)
    if not args.runs and not args.bound_explosion:
        parser.error("give at least one RUN_DIR or --bound-explosion OUT.png")

    written: dict = {"runs": {}}
    runs, run_dirs = [], []
    for arg in args.runs:
        found = find_runs(arg)
        if not found:
            print(f"{arg}: no metrics.jsonl or results.json found, skipped", file=sys.stderr)
        for run_dir in found:
            run_dirs.append(run_dir)
            rec = read_run(run_dir)
            runs.append(rec)
            figs = plot_run(rec)
            written["runs"][str(run_dir)] = figs
            for path, _ in figs.values():
                print(f"wrote {path}")
    if len(runs) > 1:
        res = plot_accuracy_scatter(runs, _scatter_path(args.out, run_dirs))
        if res is not None:
            written["scatter"] = res
            print(f"wrote {res[0]}")
        path = _scatter_path(args.out, run_dirs).with_name("tightness.png")
        res = plot_tightness_runs(runs, path)
        if res is not None:
            written["tightness"] = res
            print(f"wrote {res[0]}")
    if args.bound_explosion:
        res = plot_bound_explosion(Path(args.bound_explosion), model=args.be_model,
                                   width=args.be_width,
                                   input_shape=(3, args.be_size, args.be_size),
                                   batch=args.be_batch, eps=args.be_eps)
        written["bound_explosion"] = res
        print(f"wrote {res[0]}")
    return written


if __name__ == "__main__":
    main()
