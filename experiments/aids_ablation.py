"""CTBench's training aids one by one on the offline digits data: SABR and MTL-IBP with every aid
off, each aid alone, and all of them on, over seeds and two radii.

    python -m experiments.aids_ablation [--quick] [--seeds 0 1 2] [--eps 0.1 0.2]
                                        [--methods sabr mtl_ibp] [--rows none l1 ... all]
                                        [--epochs N] [--out DIR] [overrides ...]

Every run is ``experiment=digits_ablation`` (small CNN with full BatchNorm, Adam 1e-3) with
``method=<m> eps=<e> seed=<s>`` and the row's aids (:data:`AIDS`, fastcert.aids and
fastcert.selection): the L1 penalty, precise BatchNorm, SWA over the last sixth of training,
ReLU shrinking 0.8 in the training bound, EDAC (γ 0.3, the method's attack), and model
selection of the best IBP-verified accuracy on a 10 % validation split (its runs train on the
other 90 %). The verifiers are IBP and CROWN-IBP (:data:`VERIFIERS`; "any-verified" is either):
CROWN's intermediate bounds cost more than a whole short run of this CNN on one core, and an
``eval.verifiers=[...]`` override replaces them. Writes ``runs.csv`` (one line per run) and
``table.md`` / ``table.csv`` (mean ± std over seeds of clean, IBP-verified and any-verified
test accuracy, in %) into ``--out``, and prints the Markdown table. A run whose directory
already holds results.json is read, not rerun; one with last.pt only continues from it.
``--quick``: one seed, 4 epochs on 256 training and 100 test examples (under 5 minutes on one
core).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from pathlib import Path

from experiments.common import compose, mean_std
from fastcert.pipeline import run

#: Each aid's overrides (``{swa}``: the epoch SWA starts).
AIDS = {
    "l1": ["aids.l1=1e-5"],
    "precise_bn": ["aids.precise_bn=true"],
    "swa": ["aids.swa.start={swa}"],
    "relu_shrinkage": ["aids.relu_shrinkage=0.8"],
    "edac": ["aids.edac.gamma=0.3", "aids.edac.attack=${{method.attack}}"],
    "select": ["select.metric=ibp_verified_acc", "select.split=val", "data.val_size=0.1"],
}
ROWS = ["none", *AIDS, "all"]
METRICS = (("clean_acc", "clean"), ("ibp_verified_acc", "IBP-verified"),
           ("any_verified_acc", "any-verified"))
QUICK = ["data.limit_train=256", "data.limit_test=100"]
#: The verifiers of every run (an ``eval.verifiers=[...]`` override given after them wins).
VERIFIERS = "eval.verifiers=[ibp,crown_ibp]"


def row_overrides(row: str, swa_start: int) -> list[str]:
    """The overrides of a table row: none, one aid (a key of :data:`AIDS`) or all."""
    names = [] if row == "none" else list(AIDS) if row == "all" else [row]
    return [o.format(swa=swa_start) for name in names for o in AIDS[name]]


def schedule(epochs: int) -> list[str]:
    """digits_ablation's shape for ``epochs`` epochs: 1 at ε = 0, a ramp over a third, LR ×0.2
    at 3/4 and 11/12 (its 60 epochs: 1 + 20, milestones 45 and 55)."""
    ramp = max(1, epochs // 3)
    return [f"epochs={epochs}", "schedule.start=1", f"schedule.length={ramp}",
            f"optim.milestones=[{max(2, 3 * epochs // 4)},{max(3, 11 * epochs // 12)}]"]


def one_run(out: Path, method: str, eps: float, row: str, seed: int, base: list[str],
            swa_start: int) -> dict:
    """results.json of one run (read when it exists, else trained and evaluated; an
    interrupted run continues from its last.pt)."""
    run_dir = out / f"{method}-eps{eps:g}-{row}-s{seed}"
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    cfg = compose(["experiment=digits_ablation", f"method={method}", f"eps={eps}",
                   f"seed={seed}", *base, *row_overrides(row, swa_start)])
    return run(cfg, run_dir, resume="auto", group="aids_ablation")


def table(records: list[dict], methods, radii, rows) -> tuple[str, list[list[str]]]:
    """Markdown and CSV rows of mean ± std (in %) per method, ε and aids row."""
    head = ["method", "eps", "aids", *(name for _, name in METRICS), "seeds", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = [head]
    for method in methods:
        for eps in radii:
            for row in rows:
                got = [r for r in records if (r["method"], r["eps"], r["row"]) ==
                       (method, eps, row)]
                if not got:
                    continue
                stats = [mean_std((r[k] for r in got), scale=100, digits=1) for k, _ in METRICS]
                wall = sum(r["wall_time_s"] for r in got) / len(got)
                cell = [method, f"{eps:g}", row, *stats, str(len(got)), f"{wall:.0f}"]
                cells.append(cell)
                lines.append("| " + " | ".join(cell) + " |")
    return "\n".join(lines), cells


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 4 epochs, 256/100 examples")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--methods", nargs="+", default=["sabr", "mtl_ibp"])
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--epochs", type=int, help="default 60 (digits_ablation); --quick: 4")
    p.add_argument("--out", default="outputs/aids_ablation")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (4 if args.quick else 60)
    base = [*schedule(epochs), VERIFIERS, *(QUICK if args.quick else []), *args.overrides]
    swa_start = epochs - max(1, epochs // 6)
    out = Path(args.out)
    records, t0 = [], time.perf_counter()
    for seed in seeds:  # seed by seed: the runs done first cover every row
        for method in args.methods:
            for eps in args.eps:
                for row in args.rows:
                    res = one_run(out, method, eps, row, seed, base, swa_start)
                    records.append({"method": method, "eps": eps, "row": row, "seed": seed,
                                    **{k: res.get(k) for k, _ in METRICS},
                                    "wall_time_s": res["wall_time_s"]})
    md, cells = table(records, args.methods, args.eps, args.rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with open(out / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(cells)
    title = (f"digits, cnn_small (full BN), {epochs} epochs, SWA from epoch {swa_start}, seeds "
             f"{seeds}; test accuracy in % (mean ± std over seeds). Overrides: {' '.join(base)}")
    (out / "table.md").write_text(f"{title}\n\n{md}\n")
    print(f"\n{title}\n\n{md}\n\n({len(records)} runs, {time.perf_counter() - t0:.0f} s; "
          f"{out / 'table.md'}, {out / 'table.csv'}, {out / 'runs.csv'})")
    return records


if __name__ == "__main__":
    main()
