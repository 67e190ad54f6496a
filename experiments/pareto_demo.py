"""The Pareto demo of docs/search.md: fast IBP, SABR and MTL-IBP on the digits at ε = 0.2, one
search of ``--trials`` trials per method (``hparams_search=pareto/<method>``: clean and
certified accuracy on the 20 % validation split, the test set reported beside), and each
method's default configuration trained with the same budget, shown beside the fronts:

    python -m experiments.pareto_demo [--out multirun/pareto_demo] [--epochs 20] [--trials 20]
        [--jobs 2] [--eps 0.2] [--methods fast sabr mtl_ibp]

The defaults come first: one ``-m method=...`` sweep into ``<out>/defaults`` with the
search's fixed settings (epochs, ε, validation split, verifiers) and the digits default's
linear ε schedule scaled to ``--epochs`` (start 10/150 and length 60/150 of the epochs). Then
each method's search (``python -m fastcert.run hparams_search=pareto/<method> ...`` with the
joblib launcher, ``--jobs`` trials at once, into ``<out>/<method>``, its study
``<out>/<method>/study.db``) is topped up ``--step`` trials at a time, method after method, so
that a demo stopped early has a front for every method. Everything resumes: the same command
again tops each study up to ``--trials`` (the sweeper's ``n_trials`` is the study's total) and
skips finished default runs (``resume.checkpoint=auto``).

Written into ``<out>``: front.md (the table of :mod:`experiments.pareto`, fronts and defaults,
validation and test), front.csv, front.png, demo.json (the commands and the wall time of each
step), and one log per launch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: The methods of the demo (issue 22's acceptance).
METHODS = ("fast", "sabr", "mtl_ibp")
#: The digits default (fastcert/conf: epochs 150, linear schedule start 10, length 60).
DIGITS_EPOCHS, DIGITS_START, DIGITS_LENGTH = 150, 10, 60


def shared(args) -> list[str]:
    """The overrides every launch of the demo shares."""
    return [f"data.eps={args.eps}", f"epochs={args.epochs}", "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.jobs}"]


def search_command(method: str, args, n_trials: int) -> list[str]:
    """The search of one method, topped up to ``n_trials`` trials, ``--jobs`` at a time."""
    return ["-m", f"hparams_search=pareto/{method}", *shared(args),
            f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.n_jobs={args.jobs}",
            f"hydra.sweeper.sampler.seed={args.seed}",
            f"hydra.sweep.dir={Path(args.out) / method}"]


def default_schedule(epochs: int) -> tuple[int, int]:
    """The digits default's linear schedule scaled to ``epochs``: (start, length)."""
    start = round(epochs * DIGITS_START / DIGITS_EPOCHS)
    return start, max(1, round(epochs * DIGITS_LENGTH / DIGITS_EPOCHS))


def defaults_command(args) -> list[str]:
    """Each method's preset with the search's fixed settings (module docstring)."""
    start, length = default_schedule(args.epochs)
    return ["-m", f"method={','.join(args.methods)}", *shared(args),
            "data.val_size=0.2", "eval.verifiers=[ibp,crown_ibp,crown]",
            f"schedule.start={start}", f"schedule.length={length}",
            "optimized_metric=[val_clean_acc,val_any_verified_acc]",
            "resume.checkpoint=auto", f"hydra.sweep.dir={Path(args.out) / 'defaults'}"]


def rounds(trials: int, step: int) -> list[int]:
    """The study sizes the searches are topped up to: ``step``, ``2·step`` ... ``trials``."""
    return [*range(step, trials, step), trials] if step > 0 else [trials]


def launch(overrides: Sequence[str], log: Path) -> float:
    """``python -m fastcert.run`` with ``overrides``, its output into ``log``; the wall time.
    A launch that fails stops the demo with its log's tail."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        code = subprocess.call([sys.executable, "-m", "fastcert.run", *overrides],
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"error: {' '.join(overrides)} exited {code}; {log}:\n{tail}")
    return time.perf_counter() - t0


def report(out: Path, methods: Sequence[str]) -> str:
    """front.md / front.csv / front.png in ``out`` from the studies and the default runs."""
    from experiments import pareto as P

    points = P.load_points([str(out / m) for m in methods])
    baselines = P.points_from_runs(out / "defaults")
    text, _, _ = P.report(points, out, baselines,
                          title=f"digits, eps={_eps(points)}: fronts and defaults")
    return text


def _eps(points) -> str:
    found = {p.setting[2] for p in points}
    return str(found.pop()) if len(found) == 1 else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pareto_demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="multirun/pareto_demo")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=20, help="per method")
    parser.add_argument("--step", type=int, default=10, help="trials per method per round")
    parser.add_argument("--jobs", type=int, default=2, help="trials at once")
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, t0 = [], time.perf_counter()
    for name, overrides in [("defaults", defaults_command(args)), *(
            (m, search_command(m, args, n)) for n in rounds(args.trials, args.step)
            for m in args.methods)]:
        print(f"{name}: python -m fastcert.run {' '.join(overrides)}", flush=True)
        wall = launch(overrides, out / f"{name}.log")
        print(f"{name}: {wall:.0f} s", flush=True)
        steps.append({"step": name, "overrides": overrides, "wall_s": round(wall, 1)})
    text = report(out, args.methods)
    total = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps({"steps": steps, "wall_s": round(total, 1)},
                                              indent=1) + "\n")
    print(text)
    print(f"\nwall time {total / 60:.1f} min; {out / 'front.md'}, {out / 'front.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
