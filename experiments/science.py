"""What the experiments on the science of IBP share (tightness_init, box_reconstruction,
tightness_training, width_rule, paradox; docs/science.md): a CSV writer, a log-log slope fit,
mean ± std, the digits as plain tensors, a training run composed in process, and the figure
set-up."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from experiments.common import compose, mean_and_std

__all__ = ["compose", "mean_and_std"]


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
