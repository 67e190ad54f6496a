"""What the experiments on the science of IBP share (tightness_init, box_reconstruction,
tightness_training, width_rule, paradox; docs/science.md): a CSV writer, a log-log slope fit,
mean ± std, the digits as plain tensors, a training run composed in process, the command line
and tail of the training experiments, and the figure set-up."""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from experiments.common import compose, mean_and_std

__all__ = ["compose", "mean_and_std"]


def add_training_arguments(p: argparse.ArgumentParser, name: str, epochs: int,
                           quick: str) -> None:
    """The options every training experiment has: ``--quick`` (described by ``quick``),
    ``--seeds``, ``--epochs`` (default ``epochs``; quick 3), ``--out`` (outputs/``name``) and
    Hydra overrides for every run."""
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None, help=f"default {epochs} (--quick: 3)")
    p.add_argument("--out", default=f"outputs/{name}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")


def training_plan(args: argparse.Namespace, epochs: int) -> tuple[list[int], int, list[str]]:
    """(seeds, epochs, overrides) of :func:`add_training_arguments`'s options: seeds 0-2 and
    ``epochs``, or seed 0, 3 epochs and 120 test digits with ``--quick``. Sets one torch
    thread and silences the runs' warnings."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = (["data.limit_test=120"] if args.quick else []) + list(args.overrides)
    return seeds, args.epochs or (3 if args.quick else epochs), extra


def write_tables(out: Path, tables: dict[str, Sequence[dict]]) -> None:
    """Each non-empty table as ``<out>/<name>.csv``."""
    for name, rows in tables.items():
        if rows:
            write_csv(out / f"{name}.csv", rows)


def print_claims(checks: Sequence[dict]) -> None:
    """One line per claim: held or FAILED, the claim, the values it was judged on."""
    for c in checks:
        print(f"{'held' if c['held'] else 'FAILED'}: {c['claim']} ({c['values']})")


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """``rows`` (dicts with the same keys, in order) as a CSV with a header line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares exponent a of y ≈ c·x^a: the slope of log y against log x."""
    lx = [math.log(v) for v in x]
    ly = [math.log(v) for v in y]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
            / sum((a - mx) ** 2 for a in lx))


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(statistics.mean(math.log(v) for v in values))


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI digits shipped with scikit-learn as (N, 1, 8, 8) pixels in [0, 1] and labels:
    the inputs of the experiments that only probe a network (no training)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(bunch.target, dtype=torch.long)
    return (x, y) if n is None else (x[:n], y[:n])


def train(overrides: Sequence[str], run_dir: Path, group: str) -> dict:
    """One fastcert run into ``run_dir``: its results.json, read back where an earlier
    invocation finished it; an interrupted one resumes from its last.pt."""
    from fastcert.pipeline import run

    done = run_dir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run(compose(overrides), run_dir, group=group,
               resume=True if (run_dir / "last.pt").is_file() else None)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
