"""Reproduce the difference-gain table of weight initialisations.

Thesis Table 3.1 (Wang 2022) = Table 5 of Shi et al. 2021 (Appendix A): for each
initialisation, the closed-form difference gain (n/2)·E|W| (Eq. 6 of Shi et al. 2021) and its
empirical value (mean of 100 random trials, Definition 1) at the fan-ins of a 7-layer CNN,
n in {27, 576, 1152, 32768}. See fastcert.initializers and fastcert.gain for the definitions
and for why the baselines use fan-in-only variances. Two more rows give the difference gain of
a residual block (App. A.3 of Shi et al. 2021) with the IBP init, without and with the released
code's residual calibration (fastcert.gain.residual_block_gain).

    python -m experiments.init_gain [--trials 100] [--fan-ins 27 576 1152 32768] [--fan-out N]
                                    [--cpu-threads 1]

prints a Markdown table: per fan-in the closed form, our measurement and the printed value.
"""
from __future__ import annotations

import argparse
import sys
import time

from fastcert.config import build_option
from fastcert.gain import difference_gain, residual_block_gain

# (fastcert name, row label of Table 3.1, closed form as printed in words)
ROWS: list[tuple[str, str, str]] = [
    ("xavier_uniform", "Xavier (uniform)", "√n/4"),
    ("xavier_normal", "Xavier (Gaussian)", "√(n/2π)"),
    ("kaiming_uniform", "Kaiming (uniform)", "√(6n)/4"),
    ("kaiming_normal", "Kaiming (Gaussian)", "√(n/π)"),
    ("orthogonal", "Orthogonal", "(n/2)·Γ(n/2)/(√π·Γ((n+1)/2))*"),
    ("ibp", "IBP initialization", "1"),
]

#: (key, row label, closed form): a residual block (fan-in n) with the IBP init, whose layers
#: reading the previous block's ReLU(sum) are or are not halved (App. A.3 of Shi et al. 2021).
RESIDUAL_ROWS: list[tuple[str, str, str]] = [
    ("uncalibrated", "Residual block, IBP init (no calibration)", "2"),
    ("calibrated", "Residual block, IBP init + residual calibration (App. A.3)", "1"),
]
RESIDUAL_CLOSED_FORM = {"uncalibrated": 2.0, "calibrated": 1.0}

PAPER_FAN_INS = (27, 576, 1152, 32768)

PAPER_TABLE_3_1: dict[str, dict[int, float]] = {
    # Printed "Difference Gain" values, thesis Table 3.1 / Shi et al. 2021 Table 5.
    "xavier_uniform": {27: 1.30, 576: 6.00, 1152: 8.48, 32768: 45.25},
    "xavier_normal": {27: 2.07, 576: 9.57, 1152: 13.54, 32768: 72.2},
    "kaiming_uniform": {27: 3.20, 576: 14.70, 1152: 20.77, 32768: 110.85},
    "kaiming_normal": {27: 2.93, 576: 13.54, 1152: 19.15, 32768: 102.13},
    "orthogonal": {27: 2.09, 576: 9.58, 1152: 13.54, 32768: 72.22},
    "ibp": {27: 1.01, 576: 1.00, 1152: 1.00, 32768: 1.00},
}


def gain_table(
    fan_ins: tuple[int, ...] = PAPER_FAN_INS,
    trials: int = 100,
    fan_out: int | None = None,
    seed: int = 0,
) -> dict[str, dict[int, tuple[float, float]]]:
    """``{init: {n: (closed form, measured)}}`` for the rows of Table 3.1."""
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for name, _, _ in ROWS:
        init = build_option("init", name)
        table[name] = {
            n: (
                init.gain(n, fan_out),
                difference_gain(init, n, fan_out=fan_out, trials=trials, seed=seed),
            )
            for n in fan_ins
        }
    return table


def residual_gain_table(
    fan_ins: tuple[int, ...] = PAPER_FAN_INS,
    trials: int = 100,
    fan_out: int | None = None,
    seed: int = 0,
) -> dict[str, dict[int, tuple[float, float]]]:
    """``{"uncalibrated"|"calibrated": {n: (closed form, measured)}}`` for the residual rows."""
    ibp = build_option("init", "ibp")
    return {
        key: {
            n: (
                RESIDUAL_CLOSED_FORM[key],
                residual_block_gain(ibp, n, fan_out=fan_out, trials=trials, seed=seed,
                                    calibrated=key == "calibrated"),
            )
            for n in fan_ins
        }
        for key, _, _ in RESIDUAL_ROWS
    }


def to_markdown(
    table: dict[str, dict[int, tuple[float, float]]], fan_ins: tuple[int, ...],
    residual: dict[str, dict[int, tuple[float, float]]] | None = None,
) -> str:
    """Markdown table: per fan-in the closed form, the measured gain and the printed value
    (the residual rows, when given, have no printed value)."""
    header = ["Initialization", "Closed form"]
    for n in fan_ins:
        header += [f"n={n} closed", f"n={n} measured", f"n={n} paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for init, label, formula in ROWS:
        cells = [label, formula]
        for n in fan_ins:
            closed, measured = table[init][n]
            paper = PAPER_TABLE_3_1[init].get(n)
            cells += [f"{closed:.2f}", f"{measured:.2f}", "–" if paper is None else f"{paper:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for key, label, formula in RESIDUAL_ROWS if residual else ():
        cells = [label, formula]
        for n in fan_ins:
            closed, measured = residual[key][n]
            cells += [f"{closed:.2f}", f"{measured:.2f}", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="random trials per cell (100)")
    parser.add_argument(
        "--fan-ins", type=int, nargs="+", default=list(PAPER_FAN_INS), help="fan-ins n"
    )
    parser.add_argument(
        "--fan-out",
        type=int,
        default=None,
        help="rows of each sampled weight (default min(n, 64); see fastcert.gain)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); one is fastest here")
    args = parser.parse_args(argv)
    if args.cpu_threads > 0:
        import torch

        torch.set_num_threads(args.cpu_threads)
    fan_ins = tuple(args.fan_ins)
    start = time.perf_counter()
    table = gain_table(fan_ins, trials=args.trials, fan_out=args.fan_out, seed=args.seed)
    residual = residual_gain_table(fan_ins, trials=args.trials, fan_out=args.fan_out,
                                   seed=args.seed)
    print(to_markdown(table, fan_ins, residual))
    print()
    print(
        f"Measured: mean over {args.trials} trials of mean(Δ_i)/mean(Δ_(i-1)) (Definition 1 of "
        f"Shi et al. 2021); paper: thesis Table 3.1. *Orthogonal closed form is ours (rows "
        f"uniform on the sphere, fan_out ≤ n); the paper omits it. Residual block: "
        f"W2·ReLU(W1·x) + S·x on x = ReLU(previous sum), W1 and S of fan-in n; calibrated: W1 "
        f"and S halved, as Shi et al.'s released ibp_init does. "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
