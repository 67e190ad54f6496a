"""The Pareto fronts of searches (``hparams_search=pareto/<method>``, docs/search.md):

    python -m experiments.pareto STUDY_OR_DIR [...] [--study NAME] [--baseline DIR ...]
        [--published ctbench|kaulen2026] [--csv OUT] [--png OUT] [--wandb [ENTITY/]PROJECT]

Each input is a study (``study.db``, ``*.journal``, an ``sqlite:///`` URL) or a folder: the
studies in it (``study.db`` / ``study.journal`` at any depth, e.g. ``multirun/pareto`` holds one
per search), else its runs (every ``results.json``; their ``optimized_metric`` keys are the
objectives, all maximised). The trials of all inputs are grouped by method; a method's front
is its non-dominated COMPLETE trials in the validation objectives
(:func:`fastcert.front.non_dominated`: equal points are both on it), among the feasible ones
where the search had constraints (all of them when none is feasible, as CTRAIN's
``_constrained_pareto_trials``).

Printed: per method, the front as a table — validation clean / certified, the same model on
the test set (evaluated once at the end of the trial, never optimised), and the configuration
that got there (the trial's sampled parameters). ``--baseline DIR``: runs shown beside the
fronts (e.g. each method's default configuration trained with the same budget). ``--csv`` /
``--png``: the front rows and a plot of the fronts, methods in colours, validation left and
test right, where ``--published`` overlays the published points of the setting
(:func:`experiments.published.published_points`: CTBench's, or Kaulen et al.'s fronts, with
their sources). ``--wandb``: the front as a ``wandb.Table`` and the plot as an image in one W&B
run. The pareto presets call :func:`report_sweep` at the end of a search: front.md, front.csv
and front.png in the sweep dir, and W&B when the search ran with ``logger=wandb``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.published import CTBENCH_SETTINGS, POINT_SUITES, published_points
from fastcert.front import non_dominated

#: Files that hold a study in a sweep dir (fastcert.study).
STUDY_FILES = ("study.db", "study.journal")
_MISSING = "–"


@dataclass
class Point:
    """One trial (or run): where it came from, its method and state, its objective values on
    the validation split and their counterparts on the test set, and its configuration."""

    source: str
    number: int | None
    method: str
    state: str
    keys: list[str]                     # the objectives (results.json keys, val_*)
    values: list[float] | None          # on the validation split
    test: list[float | None] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    feasible: bool | None = None
    setting: tuple[str | None, str | None, float | None] = (None, None, None)  # data, model, eps
    run_dir: str | None = None


def test_key(key: str) -> str:
    """The test set's key of a validation objective (``val_clean_acc`` → ``clean_acc``)."""
    return key.removeprefix("val_")


# --------------------------------------------------------------------------- reading


def points_from_study(study, source: str) -> list[Point]:
    """The trials of an Optuna study written by fastcert's sweeper (discarded ones left out)."""
    from fastcert.sweep import trials as T

    objective = study.user_attrs.get("fastcert:objective")
    keys = ([objective] if isinstance(objective, str) else list(objective or [])) or [
        f"value_{i}" for i in range(len(study.directions))]
    config = study.user_attrs.get("fastcert:config") or {}
    out = []
    for t in T.counted(study.get_trials(deepcopy=False)):
        metrics = t.user_attrs.get(T.METRICS) or {}
        values = list(t.values) if t.values is not None else None
        if values is None and metrics.get("stopped_early"):
            values = [metrics.get(k) for k in keys]
        cons = t.user_attrs.get(T.CONSTRAINTS)
        out.append(Point(
            source=f"{source}:{study.study_name}", number=t.number,
            method=str(metrics.get("method") or t.params.get("method")
                       or config.get("method.name") or "?"),
            state=t.state.name, keys=keys, values=values,
            test=[metrics.get(test_key(k)) for k in keys],
            params={k.split(":", 1)[-1]: v for k, v in t.params.items() if k != "method"},
            feasible=None if cons is None else all(c <= 0 for c in cons),
            setting=(metrics.get("data"), metrics.get("model"), metrics.get("eps")),
            run_dir=t.user_attrs.get(T.RUN_DIR)))
    return out


def points_from_storage(url: str, name: str | None = None) -> list[Point]:
    """Every study of a storage (or the one named ``name``)."""
    from fastcert.study import open_study, study_names

    names = study_names(url)
    if name is not None:
        if name not in names:
            raise SystemExit(f"error: no study {name} in {url}; it has {', '.join(names)}")
        names = [name]
    return [p for n in names for p in points_from_study(open_study(n, url), url)]


def points_from_runs(folder: Path) -> list[Point]:
    """Every run under ``folder`` (its results.json and .hydra/config.yaml)."""
    from experiments.table import collect_runs

    out = []
    for run in collect_runs([folder]):
        objective = run.config.get("optimized_metric") or ["val_clean_acc",
                                                            "val_any_verified_acc"]
        keys = [objective] if isinstance(objective, str) else list(objective)
        r = run.results
        out.append(Point(
            source=str(folder), number=run.config.get("search.trial"),
            method=str(r.get("method")), keys=keys,
            state="PRUNED" if r.get("stopped_early") else "COMPLETE",
            values=None if any(r.get(k) is None for k in keys) else [r[k] for k in keys],
            test=[r.get(test_key(k)) for k in keys], params=_sampled(run.config),
            setting=(r.get("data"), r.get("model"), r.get("eps")), run_dir=run.source))
    return out


def _sampled(config: dict) -> dict:
    """A run's configuration for the table: the keys a pareto search samples."""
    keys = ("optim.name", "optim.lr", "optim.gamma", "aids.l1", "schedule.start",
            "schedule.length", "train_eps", "method.lam", "method.alpha", "method.warmup.lambda0",
            "method.kappa.start", "method.kappa.end", "method.attack.steps")
    return {k: config[k] for k in keys if k in config}


def load_points(inputs: Sequence[str], study: str | None = None) -> list[Point]:
    """The trials of every input (module docstring)."""
    from fastcert.study import storage_url

    out: list[Point] = []
    for item in inputs:
        path = Path(item)
        if "://" in item or path.is_file():
            out += points_from_storage(storage_url(item) if "://" not in item else item, study)
        elif path.is_dir():
            files = sorted(p for name in STUDY_FILES for p in path.rglob(name))
            if files:
                for f in files:
                    out += points_from_storage(storage_url(str(f)), study)
            else:
                out += points_from_runs(path)
        else:
            raise SystemExit(f"error: {item}: no such study file or folder")
    return out


# --------------------------------------------------------------------------- the fronts


def fronts(points: Sequence[Point]) -> dict[str, list[Point]]:
    """Per method, its front (module docstring), by validation clean accuracy (descending)."""
    out = {}
    for method in sorted({p.method for p in points}):
        done = [p for p in points if p.method == method and p.state == "COMPLETE"
                and p.values is not None]
        feasible = [p for p in done if p.feasible is not False]
        pool = feasible or done
        keep = non_dominated([p.values for p in pool])
        out[method] = sorted((p for p, k in zip(pool, keep) if k),
                             key=lambda p: [-v for v in p.values])
    return out


def _pct(v) -> str:
    return _MISSING if v is None else f"{100 * float(v):.2f}"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def config_text(p: Point) -> str:
    return ", ".join(f"{k.removeprefix('method.')}={_value(v)}" for k, v in
                     sorted(p.params.items()))


def _states(points: Sequence[Point]) -> str:
    counts: dict[str, int] = {}
    for p in points:
        counts[p.state] = counts.get(p.state, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def table(points: Sequence[Point], front: dict[str, list[Point]],
          baselines: Sequence[Point] = ()) -> str:
    """Markdown: per method its front and its baselines (module docstring)."""
    if not points:
        return "no trials"
    names = [test_key(k) for k in points[0].keys]
    lines = []
    for method, rows in front.items():
        mine = [p for p in points if p.method == method]
        lines += ["", f"### {method}: {len(mine)} trials ({_states(mine)}); front of "
                      f"{len(rows)}", "",
                  "| trial | " + " | ".join(f"val {n} (%)" for n in names) + " | "
                  + " | ".join(f"test {n} (%)" for n in names) + " | configuration |",
                  "|---|" + "--:|" * (2 * len(names)) + "---|"]
        for p in [*rows, *(b for b in baselines if b.method == method)]:
            label = "default" if p in baselines else str(p.number)
            lines.append(f"| {label} | " + " | ".join(_pct(v) for v in p.values or [])
                         + " | " + " | ".join(_pct(v) for v in p.test) + " | "
                         + (config_text(p) if p not in baselines else "the method's preset")
                         + " |")
    return "\n".join(lines).lstrip("\n")


def write_csv(path: str | os.PathLike, front: dict[str, list[Point]],
              baselines: Sequence[Point] = ()) -> None:
    """One row per front point (and baseline): method, trial, values, configuration."""
    rows = [p for ps in front.values() for p in ps] + list(baselines)
    if not rows:
        Path(path).write_text("")
        return
    keys = rows[0].keys
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "trial", *keys, *(f"test_{test_key(k)}" for k in keys),
                    "configuration", "study", "run_dir"])
        for p in rows:
            w.writerow([p.method, "default" if p in baselines else p.number,
                        *(p.values or []), *p.test, config_text(p), p.source, p.run_dir])


def setting_of(points: Sequence[Point]) -> str | None:
    """The CTBench setting (data set and test radius) all points share, if any."""
    from experiments.published import ctbench_setting

    found = {ctbench_setting({"data": p.setting[0], "eps": p.setting[2]}) for p in points}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- the plot


def plot(points: Sequence[Point], front: dict[str, list[Point]], out: str | os.PathLike,
         baselines: Sequence[Point] = (), published: str | None = None, title: str = "") -> Path:
    """The fronts, validation left and test right (module docstring); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=False, sharey=False)
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(front):
        c = colours(i % 10)
        _panel(axes[0], [p for p in points if p.method == method], front[method],
               [b for b in baselines if b.method == method], c, method, lambda p: p.values)
        _panel(axes[1], [p for p in points if p.method == method], front[method],
               [b for b in baselines if b.method == method], c, method, lambda p: p.test)
    if published:
        _published(axes[1], published, setting_of(points), list(front))
    keys = points[0].keys if points else ["val_clean_acc", "val_any_verified_acc"]
    for ax, where in zip(axes, ("validation split (optimised)", "test set (reported)")):
        ax.set_xlabel(f"{test_key(keys[0])} (%)")
        ax.set_ylabel(f"{test_key(keys[-1])} (%)")
        ax.set_title(where)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _xy(points, get) -> tuple[list[float], list[float]]:
    pairs = [get(p) for p in points]
    pairs = [v for v in pairs if v and len(v) >= 2 and None not in v[:2]]
    return [100 * v[0] for v in pairs], [100 * v[-1] for v in pairs]


def _panel(ax, trials, front, baselines, colour, method, get) -> None:
    """One method on one panel: its trials faint, its front joined, its baselines as crosses."""
    x, y = _xy([p for p in trials if p.state == "COMPLETE"], get)
    ax.scatter(x, y, s=12, color=colour, alpha=0.3, linewidths=0)
    fx, fy = _xy(front, get)
    order = sorted(range(len(fx)), key=lambda i: fx[i])
    ax.plot([fx[i] for i in order], [fy[i] for i in order], "o-", color=colour, ms=5,
            lw=1.2, label=f"{method} front ({len(front)})")
    bx, by = _xy(baselines, get)
    if bx:
        ax.scatter(bx, by, marker="X", s=80, color=colour, edgecolors="black",
                   label=f"{method} default")


def _published(ax, suite: str, setting: str | None, methods: list[str]) -> None:
    """The suite's published points of ``setting`` (test accuracies) as stars."""
    import matplotlib.pyplot as plt

    points = [p for p in published_points(suite, setting) if p[0] in methods]
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        mine = [p for p in points if p[0] == method]
        if mine:
            ax.scatter([p[1] for p in mine], [p[2] for p in mine], marker="*", s=90,
                       color=colours(i % 10), edgecolors="black", linewidths=0.5,
                       label=f"{method}, {suite}")


def published_note(suite: str, setting: str | None) -> str:
    """The published points' sources, or why there are none."""
    points = published_points(suite, setting)
    if not points:
        return (f"--published {suite}: no published points for this setting (CTBench "
                f"settings: {', '.join(CTBENCH_SETTINGS)})")
    sources = sorted({p[3] for p in points})
    return f"published ({suite}, {setting}): " + "; ".join(sources)


# --------------------------------------------------------------------------- W&B


def log_wandb(front: dict[str, list[Point]], png: Path, baselines: Sequence[Point] = (), *,
              project: str, entity: str | None = None, group: str | None = None,
              name: str = "pareto-front", mode: str | None = None,
              directory: str | os.PathLike | None = None) -> str:
    """One W&B run holding the front as a ``wandb.Table`` (``front``) and the plot as an image
    (``front_plot``); returns the run's id."""
    import wandb

    rows = [p for ps in front.values() for p in ps] + list(baselines)
    keys = rows[0].keys if rows else ["val_clean_acc", "val_any_verified_acc"]
    columns = ["method", "trial", *keys, *(f"test_{test_key(k)}" for k in keys),
               "configuration"]
    data = [[p.method, "default" if p in baselines else str(p.number),
             *[None if v is None else float(v) for v in (p.values or [None] * len(keys))],
             *[None if v is None else float(v) for v in p.test],
             config_text(p)] for p in rows]
    run = wandb.init(project=project, entity=entity, group=group, name=name, job_type="pareto",
                     mode=mode, dir=str(directory) if directory else None, reinit="create_new")
    try:
        run.log({"front": wandb.Table(columns=columns, data=data),
                 "front_plot": wandb.Image(str(png))})
        return run.id
    finally:
        run.finish()


# --------------------------------------------------------------------------- entry points


def report(points: Sequence[Point], out_dir: Path, baselines: Sequence[Point] = (),
           published: str | None = None, title: str = "") -> tuple[str, dict, Path]:
    """front.md, front.csv and front.png in ``out_dir``; (table, fronts, png)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    front = fronts(points)
    text = table(points, front, baselines)
    (out_dir / "front.md").write_text(text + "\n")
    write_csv(out_dir / "front.csv", front, baselines)
    png = plot(points, front, out_dir / "front.png", baselines, published, title)
    return text, front, png


def report_sweep(study, storage: str | None, sweep_dir: Path, config) -> None:
    """The pareto presets' end-of-search hook (``hydra.sweeper.report``): :func:`report` into
    the sweep dir, printed, and logged to W&B when the search ran with ``logger=wandb``."""
    from omegaconf import OmegaConf

    points = points_from_study(study, storage or "memory")
    text, front, png = report(points, Path(sweep_dir), title=study.study_name)
    print(text, flush=True)
    logger = OmegaConf.select(config, "logger")
    if logger is not None and logger.get("name") == "wandb":
        log_wandb(front, png, project=logger.project, entity=logger.get("entity"),
                  group=logger.get("group") or study.study_name,
                  name=f"front-{study.study_name}", mode=logger.get("mode"),
                  directory=sweep_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pareto",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="study files, URLs or folders")
    parser.add_argument("--study", help="only this study of a storage")
    parser.add_argument("--baseline", nargs="*", default=[], help="runs shown beside the fronts")
    parser.add_argument("--published", choices=POINT_SUITES)
    parser.add_argument("--csv", help="write the front rows here")
    parser.add_argument("--png", help="write the plot here (default: front.png beside --csv, "
                        "else none)")
    parser.add_argument("--wandb", metavar="[ENTITY/]PROJECT", help="log the front to W&B")
    args = parser.parse_args(argv)
    points = load_points(args.inputs, args.study)
    baselines = [b for d in args.baseline for b in points_from_runs(Path(d))]
    if not points:
        print("no trials found", file=sys.stderr)
        return 1
    front = fronts(points)
    print(table(points, front, baselines))
    if args.published:
        print("\n" + published_note(args.published, setting_of(points)))
    if args.csv:
        write_csv(args.csv, front, baselines)
    png = args.png or (str(Path(args.csv).with_suffix(".png")) if args.csv else None)
    if png:
        plot(points, front, png, baselines, args.published)
        print(f"plot: {png}")
    if args.wandb:
        entity, _, project = args.wandb.rpartition("/")
        if png is None:
            png = plot(points, front, Path("front.png"), baselines, args.published)
        run_id = log_wandb(front, Path(png), baselines, project=project,
                           entity=entity or None)
        print(f"W&B run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
