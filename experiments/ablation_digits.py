"""Vanilla IBP vs fast IBP (vs CROWN-IBP) on the offline digits data, over seeds.

    python -m experiments.ablation_digits [--seeds 0 1 2] [--methods ibp fast crown_ibp]
                                          [overrides ...]

The Table 1 / Table 4 comparison of Shi et al. 2021 in miniature: preset
``experiment=digits_ablation`` (ε=0.2, small CNN with full BN, a short "1+20+39" schedule), each
method with its own initialisation (fast: IBP init). Prints mean ± std of clean and IBP-verified
test accuracy and the last epoch's L_tightness / L_relu (logged for IBP-based methods, optimised
only by ``fast``). Extra arguments are Hydra overrides applied to every run (``cpu_threads``,
default 1 from conf/config.yaml, sets torch's CPU threads as in every run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

from experiments.common import compose, mean_std
from fastcert.pipeline import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["ibp", "fast", "crown_ibp"])
    p.add_argument("--out", default="outputs/ablation_digits")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = {}
    for method in args.methods:
        for seed in args.seeds:
            cfg = compose(["experiment=digits_ablation", f"method={method}", f"seed={seed}",
                           *args.overrides])
            run_dir = Path(args.out) / f"{method}-s{seed}"
            results = run(cfg, run_dir, group="digits_ablation")
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            rows.setdefault(method, []).append(
                (results["clean_acc"], results["ibp_verified_acc"], results["crown_verified_acc"],
                 last.get("reg/tightness"), last.get("reg/relu"), results["wall_time_s"]))
    print(f"\ndigits, eps={cfg.eps}, {cfg.epochs} epochs "
          f"({cfg.schedule.start}+{cfg.schedule.length}+"
          f"{cfg.epochs - cfg.schedule.start - cfg.schedule.length}), "
          f"{cfg.model.name} (bn={cfg.model.bn}), seeds {args.seeds}\n")
    print("| method | clean acc | IBP-verified acc | CROWN-verified acc | final L_tightness | "
          "final L_relu | s/run |")
    print("|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        cols = [mean_std([row[i] for row in r]) for i in range(5)]
        print(f"| {method} | " + " | ".join(cols) + f" | {statistics.mean(x[5] for x in r):.0f} |")
    return rows


if __name__ == "__main__":
    main()
