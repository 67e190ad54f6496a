"""CROWN-IBP with and without the relaxation regulariser r of Zhu et al. 2020 on the digits.

    python -m experiments.relaxation_regularizers [--quick] [--seeds 0 1 2] [--eps 0.1 0.2]
                                                  [--out DIR] [overrides ...]

Table 3 of Zhu et al. 2020 ("Baseline" vs "With r": CROWN-IBP, r phased out during the ramp)
in miniature: presets ``experiment=zhu2020/digits/crown_ibp`` and ``.../crown_ibp_r`` (small CNN
without BN, see conf/setting/zhu2020/digits.yaml), each ε and seed. For every trained model it
also measures, on the test set at the training ε, the means of Σ_t d_t (Eq. 8) and Σ_t r_t
(Eq. 9) under the CROWN-IBP relaxation the regulariser acts on (eval mode). Prints and writes
(``<out>/table.md``, ``<out>/runs.csv``) mean ± std over seeds of clean, CROWN-verified and
IBP-verified test accuracy and the final d and r. ``--quick``: one seed, 6 epochs ("1+3+2").
Extra arguments are Hydra overrides applied to every run.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from experiments.common import compose, mean_std
from fastcert.bounds import Bound
from fastcert.pipeline import build, run
from fastcert.relaxation import measure
from fastcert.settings import validate

VARIANTS = {"crown_ibp": "CROWN-IBP", "crown_ibp_r": "CROWN-IBP + r"}
QUICK = ["epochs=6", "schedule.start=1", "schedule.length=3", "optim.milestones=[5]"]
COLUMNS = ("clean_acc", "crown_verified_acc", "ibp_verified_acc", "d", "r")


def final_indicators(cfg, run_dir: Path) -> dict[str, float]:
    """Means of Σ_t d_t and Σ_t r_t of the trained model (run_dir/last.pt) on the test set at
    the training ε, CROWN-IBP bound with the adaptive relaxation, the r form it trained with."""
    built = build(validate(cfg))
    state = torch.load(run_dir / "last.pt", map_location=built.device, weights_only=False)
    built.net.model.load_state_dict(state["model"])
    return measure(built.net, built.data.test, built.data.eps_box, built.settings.eps,
                   Bound.CROWN_IBP, "adaptive", built.method.r_form, built.device)


def run_one(variant: str, eps: float, seed: int, out: Path, extra: list[str]) -> dict:
    cfg = compose([f"experiment=zhu2020/digits/{variant}", f"eps={eps}", f"seed={seed}",
                    *extra])
    run_dir = out / f"eps{eps:g}" / f"{variant}-s{seed}"
    if (run_dir / "results.json").exists():  # finished earlier: reuse (delete to rerun)
        results = json.loads((run_dir / "results.json").read_text())
    else:
        results = run(cfg, run_dir, group="zhu2020/digits")
    ind = final_indicators(cfg, run_dir)
    return {"variant": variant, "eps": eps, "seed": seed, **{k: results[k] for k in COLUMNS[:3]},
            "d": ind["d"], "r": ind["r"], "unstable": ind["unstable"],
            "wall_time_s": results["wall_time_s"], "epochs": results["epochs"],
            "n_test": results["n_test"]}


def table(rows: list[dict]) -> str:
    """Markdown: per ε and variant, mean ± std over seeds of the accuracies, d and r."""
    lines = ["| ε | method | seeds | clean acc | CROWN-verified acc | IBP-verified acc | "
             "final Σ_t d_t | final Σ_t r_t | s/run |", "|---" * 9 + "|"]
    for eps in sorted({r["eps"] for r in rows}):
        for variant, label in VARIANTS.items():
            group = [r for r in rows if r["eps"] == eps and r["variant"] == variant]
            if not group:
                continue
            cells = [mean_std([r[c] for r in group]) for c in COLUMNS]
            wall = statistics.mean(r["wall_time_s"] for r in group)
            lines.append(f"| {eps:g} | {label} | {len(group)} | " + " | ".join(cells) +
                         f" | {wall:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, 6 epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--out", default="outputs/relaxation_regularizers")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = (QUICK if args.quick else []) + args.overrides
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [run_one(v, eps, s, out, extra) for eps in args.eps for v in VARIANTS for s in seeds]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = compose([f"experiment=zhu2020/digits/{next(iter(VARIANTS))}", *extra])
    head = (f"digits, {cfg.model.name} (bn={cfg.model.bn}), {cfg.epochs} epochs "
            f"({cfg.schedule.start}+{cfg.schedule.length}+"
            f"{cfg.epochs - cfg.schedule.start - cfg.schedule.length}), seeds {seeds}; "
            f"accuracies on the {rows[0]['n_test']} test images at the training ε; d, r: test-set "
            f"means under CROWN-IBP ({time.perf_counter() - t0:.0f} s in all)")
    text = head + "\n\n" + table(rows) + "\n"
    (out / "table.md").write_text(text)
    print("\n" + text)
    return rows


if __name__ == "__main__":
    main()
