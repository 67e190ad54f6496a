"""Every training method side by side on the offline digits, at ε = 0.1 and ε = 0.2.

    python -m experiments.compare_methods [--quick] [--seeds 0 1 2] [--methods ...] [--eps ...]
                                          [--epochs N] [--out DIR] [overrides ...]

Each method (every option of ``conf/method`` but full-CROWN training,
:data:`experiments.EXPENSIVE_METHODS`; each with its default config: the IBP-based ones with IBP
initialisation and the warmup regularisers, as their authors train them) trains
``cnn_small`` (full BatchNorm) on the digits with the same short schedule: ``--epochs`` (36)
epochs, ε = 0 for the first, a smoothed ramp over a third of the rest (11 of 36;
``SmoothedSchedule``, the shape of auto_LiRPA / CTBench), Adam lr 1e-3 ×0.2 at 75 % and 90 %
of training (epochs 27 and 32 of 36), batch 64. The test
evaluation (360 digits) gives clean, PGD (20 steps), IBP- and CROWN-verified accuracy; the
propagation tightness τ (Mao et al. 2024) is the last epoch's, on the first 64 test digits at
the training ε; s/epoch is the mean epoch time. Printed per ε as mean ± std over the seeds
(percent), and written with every run's numbers to ``<out>/summary.json``.

``--quick``: one seed, 3 epochs (1 at ε = 0, 1 of ramp) and a fixed subset of 120 test digits, for
smoke checks (a few minutes on 2 cores). Extra arguments are Hydra overrides applied to every
run. Runs already finished under ``--out`` are read, not retrained; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from experiments import EXPENSIVE_METHODS, default_methods
from experiments.common import compose, mean_std
from fastcert.config import options
from fastcert.pipeline import run
from fastcert.train import read_metrics

EPS = (0.1, 0.2)
COLUMNS = (("clean", "clean_acc"), ("PGD", "pgd_acc"), ("IBP-verified", "ibp_verified_acc"),
           ("CROWN-verified", "crown_verified_acc"))


def schedule(epochs: int) -> list[str]:
    """The shared short schedule: 1 epoch at ε = 0, a smoothed ramp over a third of the rest,
    LR ×0.2 at 75 % and 90 % of training."""
    ramp = max(1, (epochs - 1) // 3)
    return [f"epochs={epochs}", "schedule=smoothed", "schedule.start=1",
            f"schedule.length={ramp}", f"optim.milestones=[{int(0.75 * epochs)},"
            f"{int(0.9 * epochs)}]"]


def overrides(method: str, eps: float, seed: int, epochs: int, extra=()) -> list[str]:
    return ["data=digits", "model=cnn_small", f"method={method}", f"eps={eps}", f"seed={seed}",
            "optim.lr=1e-3", "eval.verifiers=[ibp,crown]", "device=cpu", "cpu_threads=1",
            *schedule(epochs), *extra]


def train_one(method: str, eps: float, seed: int, epochs: int, out: Path, extra=()) -> dict:
    cfg = compose(overrides(method, eps, seed, epochs, extra))
    run_dir = out / f"eps{eps}" / f"{method}-s{seed}"
    done = run_dir / "results.json"
    if done.is_file():  # finished by an earlier invocation with the same --out
        results = json.loads(done.read_text())
    else:
        results = run(cfg, run_dir, group="compare_methods",
                      resume=True if (run_dir / "last.pt").is_file() else None)
    history = read_metrics(run_dir / "metrics.jsonl")
    return {**{key: results[key] for _, key in COLUMNS},
            "tightness": history[-1].get("tightness"),
            "s_per_epoch": statistics.mean(r["epoch_time_s"] for r in history),
            "seed": seed, "run_dir": str(run_dir)}


def _cell(values, scale: float = 1.0, digits: int = 1) -> str:
    return mean_std(values, scale=scale, digits=digits, empty="–", bare_single=True)


def markdown(rows: dict[str, list[dict]]) -> str:
    """One line per method: mean ± std over its runs (accuracies in %)."""
    head = ["method"] + [name for name, _ in COLUMNS] + ["tightness τ", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for method, runs in rows.items():
        cells = [_cell([r[key] for r in runs], 100) for _, key in COLUMNS]
        cells.append(_cell([r["tightness"] for r in runs], digits=3))
        cells.append(_cell([r["s_per_epoch"] for r in runs], digits=2))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, 3 epochs (smoke check)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"default: every conf/method but {', '.join(EXPENSIVE_METHODS)}")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    p.add_argument("--epochs", type=int, default=None, help="default 36 (--quick: 3)")
    p.add_argument("--out", default="outputs/compare_methods")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (3 if args.quick else 36)
    methods = args.methods or default_methods()
    unknown = sorted(set(methods) - set(options("method")))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {options('method')}")
    warnings.filterwarnings("ignore")
    extra = (["data.limit_test=120"] if args.quick else []) + list(args.overrides)
    out = Path(args.out)
    t0 = time.perf_counter()
    summary = {"epochs": epochs, "seeds": seeds, "schedule": schedule(epochs),
               "overrides": extra, "eps": {}}
    for eps in args.eps:
        rows = {m: [train_one(m, eps, s, epochs, out, extra) for s in seeds]
                for m in methods}
        summary["eps"][str(eps)] = rows
        print(f"\ndigits, eps={eps}, cnn_small (bn=full), {epochs} epochs "
              f"({' '.join(schedule(epochs)[1:])}), seeds {seeds}; accuracy in % of the "
              f"test digits, τ on the first 64\n")
        print(markdown(rows), flush=True)
    summary["wall_time_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{len(args.eps) * len(methods) * len(seeds)} runs in "
          f"{summary['wall_time_s'] / 60:.1f} min; wrote {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
