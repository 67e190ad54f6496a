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
