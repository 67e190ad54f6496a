"""The published numbers the CTBench table quotes (``python -m experiments.table --published
ctbench``): per CTBench setting and method, the clean / certified accuracy of CNN-7 and its
source, beside fastcert's mean ± std over matching runs."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from experiments.common import mean_std

if TYPE_CHECKING:
    from experiments.table import Run

_MISSING = "–"

#: The CTBench settings (conf/setting/ctbench): data set and test radius (pixel units).
CTBENCH_SETTINGS = {"mnist_0_1": ("mnist", 0.1), "mnist_0_3": ("mnist", 0.3),
                    "cifar10_2": ("cifar10", 2 / 255), "cifar10_8": ("cifar10", 8 / 255),
                    "tinyimagenet_1": ("tinyimagenet", 1 / 255)}
CTBENCH_METHODS = ("ibp", "fast", "crown_ibp", "sabr", "taps", "staps", "mtl_ibp", "cc_ibp",
                   "exp_ibp", "pgd")
_SABR = "Müller et al. 2023 (SABR) Table 1, MN-BaB"
_CTB = "CTBench arXiv v4 Table 22 (second-hand)"
_EL = "De Palma et al. 2024 Table 1 (second-hand)"
_TALK = "Mao 2024 talk table, PGD accuracy not certified"
#: (setting, method) -> (clean %, certified %, source) for CNN-7; None where not published or
#: not readable here ("second-hand": as a third party quotes the table). CTBench's own table
#: was not readable, so most rows quote the methods' papers; "fast" carries the IBP rows, since
#: CTBench's and the SABR paper's IBP baseline is Shi et al.'s recipe (IBP init + warmup
#: regularisers).
PUBLISHED = {
    "ctbench": {
        ("mnist_0_1", "fast"): (98.84, 97.95, _SABR + " (IBP, Shi et al.)"),
        ("mnist_0_1", "crown_ibp"): (98.83, 97.76, _SABR),
        ("mnist_0_1", "sabr"): (99.23, 98.22, _SABR),
        ("mnist_0_3", "fast"): (97.67, 93.10, _SABR + " (IBP, Shi et al.)"),
        ("mnist_0_3", "crown_ibp"): (98.18, 92.98, _SABR),
        ("mnist_0_3", "sabr"): (98.75, 93.40, _SABR),
        ("cifar10_2", "fast"): (67.49, 55.99, _CTB),
        ("cifar10_2", "crown_ibp"): (67.60, 57.11, _CTB),
        ("cifar10_2", "sabr"): (77.86, 63.61, _CTB),
        ("cifar10_2", "taps"): (74.44, 61.27, _CTB),
        ("cifar10_2", "staps"): (77.05, 64.21, _CTB),
        ("cifar10_2", "mtl_ibp"): (78.82, 64.41, _CTB),
        ("cifar10_2", "cc_ibp"): (80.09, 63.78, _EL),
        ("cifar10_2", "exp_ibp"): (80.61, 61.65, _EL),
        ("cifar10_2", "pgd"): (81.2, None, _TALK),
        ("cifar10_8", "fast"): (48.94, 34.97, _SABR + " (IBP, Shi et al.)"),
        ("cifar10_8", "crown_ibp"): (46.29, 33.38, _SABR + " (Xu et al.)"),
        ("cifar10_8", "sabr"): (52.38, 35.13, _SABR),
        ("cifar10_8", "mtl_ibp"): (53.35, 35.44, _EL + ", 260 epochs"),
        ("cifar10_8", "cc_ibp"): (53.71, 35.27, _EL + ", 260 epochs"),
        ("cifar10_8", "exp_ibp"): (53.97, 35.04, _EL + ", 260 epochs"),
        ("cifar10_8", "pgd"): (69.3, None, _TALK),
        ("tinyimagenet_1", "fast"): (25.92, 17.87, _SABR + " (IBP, Shi et al.)"),
        ("tinyimagenet_1", "crown_ibp"): (25.62, 17.93, _SABR + " (Shi et al.)"),
        ("tinyimagenet_1", "sabr"): (28.85, 20.46, _SABR + ", 56x56 crops"),
        ("tinyimagenet_1", "taps"): (None, 22.0, "Mao et al. 2023 (TAPS) abstract, ≈"),
    },
}


def _pct(v: float | None) -> str:
    return _MISSING if v is None else f"{v:.2f}"


def _accuracy_stat(runs: Sequence[Run], key) -> str:
    """Mean ± std of an accuracy over ``runs``, in %."""
    values = [key(r.results) for r in runs]
    return mean_std([None if v is None else float(v) for v in values], scale=100, digits=2,
                     empty=_MISSING, bare_single=True)


def _verified(results: dict):
    got = results.get("any_verified_acc")
    return got if got is not None else results.get("ibp_verified_acc")


def ctbench_setting(results: dict) -> str | None:
    """The CTBench setting a run's results.json belongs to (data set and test ε), or None."""
    for name, (data, eps) in CTBENCH_SETTINGS.items():
        if results.get("data") == data and results.get("eps") is not None \
                and math.isclose(float(results["eps"]), eps, rel_tol=1e-4):
            return name
    return None


def published_table(runs: Sequence[Run], suite: str = "ctbench") -> str:
    """Markdown: setting, method, published clean / certified % and source, and fastcert's
    mean ± std clean / verified % (n runs) over the matching ``runs``."""
    if suite not in PUBLISHED:
        raise ValueError(f"--published {suite}: choose one of {', '.join(PUBLISHED)}")
    by_row: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        setting = ctbench_setting(run.results)
        if setting is not None:
            by_row.setdefault((setting, run.results.get("method")), []).append(run)
    lines = ["| setting | method | published clean | published certified | source | "
             "fastcert clean | fastcert verified | n |", "|---|---|--:|--:|---|--:|--:|--:|"]
    for setting in CTBENCH_SETTINGS:
        for method in CTBENCH_METHODS:
            clean, cert, source = PUBLISHED[suite].get((setting, method), (None, None, ""))
            mine = by_row.get((setting, method), [])
            lines.append(f"| {setting} | {method} | {_pct(clean)} | {_pct(cert)} | "
                         f"{source or _MISSING} | "
                         f"{_accuracy_stat(mine, lambda r: r.get('clean_acc'))} | "
                         f"{_accuracy_stat(mine, _verified)} | {len(mine) or _MISSING} |")
    return "\n".join(lines)


_KAULEN = ("Kaulen, Shavit & Hoos 2026 (ICML), CTRAIN papers/rethinking_evaluation_paradigms/"
           "tables/main/results_{}.tex, column 'Ours' (commit d5a8371); complete verification; "
           "tuned on the test set")
#: Kaulen et al.'s completely verified Pareto fronts for CNN-7, (setting, fastcert method) ->
#: [(clean %, certified %)], transcribed from the tables of their repository (their method
#: ``shi`` is fastcert's ``fast``; ``crown_ibp_nofusion``, CROWN-IBP without loss fusion, is
#: ``crown_ibp`` on CIFAR-10 and MNIST). Their main protocol tuned on the test set (their
#: ``submit_hpo.py`` passes the test loader as the validation loader).
KAULEN_FRONTS = {
    "cifar10_2": ("cifar10_cnn7_eps0.0078", {
        "crown_ibp": [(79.49, 54.13), (78.26, 54.57), (78.14, 55.47), (77.69, 57.11),
                      (77.44, 58.94), (76.78, 59.86), (76.33, 60.94)],
        "mtl_ibp": [(81.54, 62.82), (79.95, 63.99), (79.87, 64.54), (79.10, 64.61)],
        "sabr": [(83.10, 60.03), (83.01, 60.87), (82.72, 61.20), (81.96, 64.11),
                 (80.15, 64.44), (79.90, 64.49)],
        "fast": [(75.26, 54.29), (74.01, 55.53), (71.40, 55.54), (69.37, 55.63),
                 (69.18, 55.99)],
    }),
    "cifar10_8": ("cifar10_cnn7_eps0.0314", {
        "crown_ibp": [(61.43, 28.72), (60.01, 29.60), (58.89, 31.57), (56.80, 33.06),
                      (55.11, 33.77), (52.63, 33.99), (52.47, 34.41), (49.73, 34.78)],
        "mtl_ibp": [(58.82, 32.55), (58.27, 33.41), (56.93, 33.75), (55.29, 34.49),
                    (55.03, 34.72), (54.18, 35.27), (52.58, 35.35), (52.33, 35.68),
                    (51.87, 35.74)],
        "sabr": [(59.12, 28.68), (58.49, 29.27), (58.20, 30.56), (58.12, 31.55),
                 (56.02, 34.26), (54.93, 34.96)],
        "fast": [(62.20, 28.33), (61.90, 28.37), (61.23, 29.63), (59.94, 31.12),
                 (58.43, 31.78), (57.42, 32.29), (56.87, 32.83), (56.73, 33.36),
                 (55.97, 33.42), (55.39, 34.25), (53.55, 34.66), (52.59, 35.09),
                 (50.98, 35.35)],
    }),
    "mnist_0_3": ("mnist_cnn7_eps0.3000", {
        "crown_ibp": [(97.85, 93.23)],
        "mtl_ibp": [(98.67, 92.21)],
    }),
    "tinyimagenet_1": ("tinyimagenet_cnn7_eps0.0039", {
        "crown_ibp": [(32.38, 20.71), (31.21, 20.96), (30.82, 22.20)],
        "mtl_ibp": [(39.80, 30.45), (39.75, 30.67)],
        "sabr": [(42.27, 23.13), (42.10, 27.42), (40.61, 28.86)],
        "fast": [(34.24, 20.79), (32.12, 21.60), (31.92, 21.82)],
    }),
}
#: The suites ``--published`` takes in ``python -m experiments.pareto``.
POINT_SUITES = ("ctbench", "kaulen2026")


def published_points(suite: str, setting: str | None) -> list[tuple[str, float, float, str]]:
    """(method, clean %, certified %, source) of a suite's published points for a CTBench
    setting (:data:`CTBENCH_SETTINGS`): CTBench's one point per method (:data:`PUBLISHED`;
    those without a certified accuracy left out), or Kaulen et al.'s fronts
    (:data:`KAULEN_FRONTS`). [] for a setting the suite does not cover."""
    if suite not in POINT_SUITES:
        raise ValueError(f"--published {suite}: choose one of {', '.join(POINT_SUITES)}")
    if suite == "ctbench":
        return [(method, clean, cert, source) for (s, method), (clean, cert, source)
                in PUBLISHED["ctbench"].items()
                if s == setting and clean is not None and cert is not None]
    table, fronts = KAULEN_FRONTS.get(setting, (None, {}))
    return [(method, clean, cert, _KAULEN.format(table)) for method, points in fronts.items()
            for clean, cert in points]
