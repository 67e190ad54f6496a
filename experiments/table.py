"""Collect finished runs into a results table like Table 1 of Shi et al. (2021).

    python -m experiments.table DIR... [--csv OUT] [--ignore KEY ...]
    python -m experiments.table --wandb [ENTITY/]PROJECT [--csv OUT]
    python -m experiments.table --published ctbench [DIR ...]

Every ``results.json`` under each DIR (a multirun dir, ``outputs/`` or a single run dir,
searched recursively) is one run; its config is ``<run>/.hydra/config.yaml`` (the fields of
results.json when that is missing). Runs are grouped by every config value that differs between
them except the seed and per-run details (device, paths, resume, logger). A row per group gives
standard error (100 − clean accuracy %), verified error (100 − IBP-verified %, and CROWN where
it was evaluated) and PGD error, as mean ± sample std over the group's seeds, with n the number
of seeds. ``--csv`` writes the same rows with the means and stds in separate columns.
``--wandb`` reads runs' config and summary from the W&B API instead (needs network access).

``--published ctbench`` prints the CTBench settings' table
(:mod:`experiments.published`): per setting and method (the presets
``conf/experiment/ctbench/<setting>/<method>``) the published clean / certified accuracy with
its source, beside a "fastcert" column of mean ± std clean / verified accuracy
(``any_verified_acc``, else ``ibp_verified_acc``) over the runs found in the DIRs whose data
set, test ε and method match (empty without runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.published import PUBLISHED, published_table

# Config keys (or prefixes, "logger" covers "logger.*") that never define a group.
IGNORED = ("seed", "device", "devices", "resume", "optimized_metric", "logger", "paths",
           "data.root", "data.download", "data.num_workers", "hydra", "checkpoint")
# Grouping columns in this order, then the rest in config order. The table's identity columns
# (ALWAYS) are shown whenever they differ; any other key only when it splits a group further
# (e.g. init.name is left out when method=fast implies init=ibp; so are the method's own keys).
PRIORITY = ("data.name", "model.name", "method.name", "eps", "epochs", "init.name",
            "schedule.name", "schedule.start", "schedule.length")
ALWAYS = PRIORITY[:5]
# (column, results.json key): error = 100 - 100·accuracy.
METRICS = (("Standard error (%)", "clean_acc"), ("Verified error IBP (%)", "ibp_verified_acc"),
           ("Verified error CROWN (%)", "crown_verified_acc"), ("PGD error (%)", "pgd_acc"))
_MISSING = "–"


@dataclass
class Run:
    """One finished run: where it came from, its flat config and its results."""

    source: str
    config: dict[str, Any]
    results: dict[str, Any]
    mtime: float = 0.0

    @property
    def seed(self):
        return self.config.get("seed", self.results.get("seed"))


@dataclass
class Row:
    values: dict[str, Any]                       # grouping column -> value
    runs: list[Run] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)


# --------------------------------------------------------------------------- reading runs


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b": value}``; lists become tuples (hashable)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: ()}
    if isinstance(obj, (list, tuple)):
        return {prefix[:-1]: tuple(_hashable(v) for v in obj)}
    return {prefix[:-1]: obj}


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def load_config(path: Path) -> dict[str, Any]:
    """A run's saved Hydra config, interpolations resolved where they can be (``${data.eps}``);
    a value that cannot be resolved outside the run (``${hydra:...}``) stays as written."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:
        raw = flatten(OmegaConf.to_container(cfg, resolve=False))
        out = {}
        for key, value in raw.items():
            try:
                got = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                out[key] = _hashable(OmegaConf.to_container(got, resolve=True)
                                     if OmegaConf.is_config(got) else got)
            except Exception:
                out[key] = value
        return out


def config_from_results(results: dict) -> dict[str, Any]:
    """The identity of a run without a saved config, from results.json."""
    out = {f"{k}.name": results[k] for k in ("data", "model", "method", "init") if k in results}
    out.update({k: results[k] for k in ("eps", "epochs", "seed") if k in results})
    return out


def collect_runs(dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """Every results.json under ``dirs`` (recursively), with its run's config."""
    runs, seen = [], set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such directory")
        found = [d] if d.is_file() else sorted(d.rglob("results.json"))
        for path in found:
            path = path.resolve()
            if path in seen:
                continue
            seen.add(path)
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            cfg_path = path.parent / ".hydra" / "config.yaml"
            config = load_config(cfg_path) if cfg_path.exists() else config_from_results(results)
            runs.append(Run(str(path.parent), config, results, path.stat().st_mtime))
    return runs


def runs_from_wandb(project: str, timeout: int = 30) -> list[Run]:
    """Finished W&B runs of ``[entity/]project`` with a fastcert summary (online only)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise SystemExit(f"--wandb {project}: WANDB_MODE={mode}; reading runs needs the W&B API "
                         f"online. Summarise local run dirs instead (python -m experiments.table "
                         f"multirun/...), or `wandb sync` offline runs first.")
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package (pip install wandb)") from None
    try:
        api = wandb.Api(timeout=timeout)
        remote = list(api.runs(project))
    except Exception as e:  # no network, no API key, unknown project
        raise SystemExit(f"--wandb {project}: could not read runs from W&B ({type(e).__name__}: "
                         f"{e}). It needs network access and an API key (`wandb login` or "
                         f"WANDB_API_KEY); offline, summarise the local run dirs instead.") \
            from None
    runs = []
    for r in remote:
        summary = {k: v for k, v in dict(r.summary).items() if not k.startswith("_")}
        if "clean_acc" not in summary or getattr(r, "state", "finished") != "finished":
            continue
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        runs.append(Run(f"wandb:{r.path if isinstance(r.path, str) else '/'.join(r.path)}",
                        flatten(config), summary))
    return runs


# --------------------------------------------------------------------------- grouping


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


def grouping_keys(runs: Sequence[Run], ignore: Sequence[str] = IGNORED) -> list[str]:
    """The config keys whose values differ between runs, most readable first; a key outside
    ALWAYS is left out when the earlier keys already imply it (same groups either way)."""
    order: dict[str, None] = {}
    for run in runs:
        for key in run.config:
            order.setdefault(key, None)
    differing = [k for k in order if not _ignored(k, ignore)
                 and len({run.config.get(k, _MISSING) for run in runs}) > 1]
    differing.sort(key=lambda k: (PRIORITY.index(k) if k in PRIORITY else len(PRIORITY)))
    chosen = [k for k in differing if k in ALWAYS]
    n_groups = len({tuple(run.config.get(k, _MISSING) for k in chosen) for run in runs})
    for key in (k for k in differing if k not in ALWAYS):
        n = len({tuple(run.config.get(k, _MISSING) for k in chosen + [key]) for run in runs})
        if n > n_groups:
            chosen.append(key)
            n_groups = n
    return chosen


def common_settings(runs: Sequence[Run], keys: Sequence[str] = PRIORITY) -> dict[str, Any]:
    """The identity settings all runs share (the table's caption)."""
    out = {}
    for key in keys:
        values = {run.config.get(key, _MISSING) for run in runs}
        if len(values) == 1 and _MISSING not in values:
            out[key] = values.pop()
    return out


def group_runs(runs: Sequence[Run], ignore: Sequence[str] = IGNORED) -> tuple[list[str], list[Row]]:
    """(grouping columns, one row per group). A group keeps one run per seed: the newest."""
    keys = grouping_keys(runs, ignore)
    if not keys:
        keys = ["method.name"] if any("method.name" in r.config for r in runs) else []
    groups: dict[tuple, dict[Any, Run]] = {}
    for run in sorted(runs, key=lambda r: r.mtime):
        values = tuple(run.config.get(k, _MISSING) for k in keys)
        by_seed = groups.setdefault(values, {})
        if run.seed in by_seed:
            print(f"warning: {run.source} repeats seed {run.seed} of {by_seed[run.seed].source}; "
                  f"keeping the newer", file=sys.stderr)
        by_seed[run.seed] = run
    rows = [Row(dict(zip(keys, values)), sorted(by_seed.values(), key=lambda r: str(r.seed)))
            for values, by_seed in groups.items()]
    rows.sort(key=lambda row: tuple(_sort_key(row.values[k]) for k in keys))
    return keys, rows


def _sort_key(v: Any) -> tuple:
    if isinstance(v, bool) or v is None:
        return (0, str(v))
    if isinstance(v, (int, float)):
        return (1, v, "")
    return (2, str(v))


def error_stats(row: Row, metric: str) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, count) of 100 − 100·metric over the row's runs that have it."""
    errors = [100.0 - 100.0 * float(r.results[metric]) for r in row.runs
              if r.results.get(metric) is not None]
    if not errors:
        return None, None, 0
    mean = sum(errors) / len(errors)
    if len(errors) < 2:
        return mean, None, len(errors)
    var = sum((e - mean) ** 2 for e in errors) / (len(errors) - 1)
    return mean, math.sqrt(var), len(errors)


def metric_columns(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """The metric columns with at least one value (CROWN only where it was evaluated)."""
    return [(name, key) for name, key in METRICS
            if any(r.results.get(key) is not None for row in rows for r in row.runs)]


# --------------------------------------------------------------------------- output


def label(key: str) -> str:
    return key[:-len(".name")] if key.endswith(".name") else key


def fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_stat(mean: float | None, std: float | None) -> str:
    if mean is None:
        return _MISSING
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(keys: Sequence[str], rows: Sequence[Row], metrics: Sequence[tuple[str, str]]) -> str:
    head = [label(k) for k in keys] + ["n"] + [name for name, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(
        ["---"] * len(keys) + ["--:"] * (1 + len(metrics))) + "|"]
    for row in rows:
        cells = [fmt_value(row.values[k]) for k in keys] + [str(row.n)]
        cells += [fmt_stat(*error_stats(row, key)[:2]) for _, key in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, keys: Sequence[str], rows: Sequence[Row],
              metrics: Sequence[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = [label(k) for k in keys] + ["n", "seeds"]
        for _, key in metrics:
            err = key.replace("_acc", "_err")
            head += [f"{err}_mean", f"{err}_std"]
        w.writerow(head)
        for row in rows:
            cells = [fmt_value(row.values[k]) for k in keys] + [
                row.n, " ".join(str(r.seed) for r in row.runs)]
            for _, key in metrics:
                mean, std, _ = error_stats(row, key)
                cells += ["" if mean is None else f"{mean:.4f}",
                          "" if std is None else f"{std:.4f}"]
            w.writerow(cells)


def table(runs: Sequence[Run], ignore: Sequence[str] = IGNORED) -> tuple[str, list[str],
                                                                         list[Row], list]:
    """(Markdown text with its caption, grouping columns, rows, metric columns)."""
    keys, rows = group_runs(runs, ignore)
    metrics = metric_columns(rows)
    common = common_settings(runs, [k for k in PRIORITY if k not in keys])
    caption = ", ".join(f"{label(k)}={fmt_value(v)}" for k, v in common.items())
    text = (f"{len(runs)} runs" + (f"; {caption}" if caption else "") + "\n\n"
            + markdown(keys, rows, metrics))
    return text, keys, rows, metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.table", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="multirun / outputs / run dirs (searched recursively)")
    p.add_argument("--csv", metavar="OUT", help="also write the rows to this CSV file")
    p.add_argument("--wandb", metavar="PROJECT", help="read runs from W&B ([entity/]project)")
    p.add_argument("--ignore", metavar="KEY", nargs="+", default=[],
                   help="more config keys (or prefixes) not to group by")
    p.add_argument("--published", metavar="SUITE", choices=sorted(PUBLISHED),
                   help="the suite's published numbers beside the runs' (ctbench)")
    args = p.parse_args(argv)
    if not args.dirs and not args.wandb and not args.published:
        p.error("give at least one DIR or --wandb PROJECT")
    try:
        runs = collect_runs(args.dirs)
    except FileNotFoundError as e:
        p.error(str(e))
    if args.published:
        print(published_table(runs + (runs_from_wandb(args.wandb) if args.wandb else []),
                              args.published))
        return 0
    if args.wandb:
        runs += runs_from_wandb(args.wandb)
    if not runs:
        print(f"no results.json found under {' '.join(args.dirs) or args.wandb}", file=sys.stderr)
        return 1
    text, keys, rows, metrics = table(runs, tuple(IGNORED) + tuple(args.ignore))
    print(text)
    if args.csv:
        write_csv(args.csv, keys, rows, metrics)
        print(f"\nwrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
