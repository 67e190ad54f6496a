"""What ``python -m fastcert.run`` checks before Hydra starts a job, so that a refused command
writes nothing and two launches never share a directory.

1. The command line as Hydra reads it: Hydra's own errors (an unknown key, an option that a
   config group does not have, an override it cannot parse, a sweep without ``-m``) become
   one line (:class:`fastcert.cli.UsageError`), e.g. ``error: unknown key epoch; did you mean
   epochs?``.
2. Every job's config, composed as Hydra composes it, through
   :func:`fastcert.settings.validate`; in a sweep each value of each swept key once (a range:
   its two ends; an interval: none), so that a mistake in the last job is found before the
   first one trains.
3. A single run's resume (:func:`fastcert.resume.check_resume`).
4. The output dir. A timestamped name (``${now:...}`` in ``hydra.run.dir`` or
   ``hydra.sweep.dir``: the defaults ``outputs/DATE/TIME`` and ``multirun/DATE/TIME``) is
   claimed (:func:`fastcert.rundir.claim`); where another launch took the name this one gets
   the next free suffix and says so in one line. The claimed dir reaches Hydra as an explicit
   ``hydra.run.dir`` / ``hydra.sweep.dir``. An explicit dir (the resume path) is used as
   given: created if missing, never renamed.

``--help``, ``--cfg``, ``--info`` and shell completion are left to Hydra.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from fastcert import distributed, rundir
from fastcert.cli import UsageError
from fastcert.config import CONF_DIR, options
from fastcert.settings import validate

#: Longest list of options an error names in full.
MAX_LISTED = 20
#: Characters Hydra's override grammar reads in an unquoted value.
UNQUOTED = re.compile(r"[\w/\-+.%*@?|:]+")


@dataclass
class Prepared:
    """The command line to hand to Hydra and the directories this process created (removed
    again, where still empty, if the job is refused: :func:`fastcert.rundir.release`)."""

    argv: list[str]
    created: list[Path] = field(default_factory=list)


def prepare(argv: list[str], task_module: str = "fastcert.run") -> Prepared:
    """Check ``argv`` (``sys.argv[1:]`` of ``python -m fastcert.run``) as described in the
    module docstring; raises :class:`UsageError`, ``ConfigError`` or ``CheckpointError``."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return Prepared(list(argv))
    hydra = _hydra(args, task_module)
    try:
        return _prepare(hydra, args, list(argv))
    finally:
        GlobalHydra.instance().clear()


def _hydra(args, task_module: str):
    """A Hydra instance with the search path ``hydra.main`` builds for the task module."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_automatic_config_search_path(None, task_module,
                                                      args.config_path or "conf")
    if args.config_dir is not None:
        search_path.prepend(provider="command-line",
                            path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name=task_module.rsplit(".", 1)[-1],
                                    config_search_path=search_path)


def _prepare(hydra, args, argv: list[str]) -> Prepared:
    from hydra.types import RunMode

    config_name = args.config_name or "config"
    overrides = parse_overrides(args.overrides, hydra)
    jobs = sweep_jobs(overrides)
    first = compose(hydra, config_name, jobs[0], overrides)
    multirun = bool(args.multirun) or first.hydra.mode == RunMode.MULTIRUN
    sweeps = [o for o in overrides if o.is_sweep_override()]
    if sweeps and not multirun:
        raise UsageError(f"{sweeps[0].input_line} sweeps over several values: add -m to run "
                         f"one job per value (a list value is written [a,b])")
    configs = [first] + [compose(hydra, config_name, job, overrides) for job in jobs[1:]]
    for cfg in configs:
        validate(task_config(cfg))
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if not multirun:
        check_run(task_config(first), Path(str(OmegaConf.select(first, key))))
    out, created, claimed = output_dir(first, key)
    return Prepared(argv + ([f"{key}={quote(str(out))}"] if claimed else []), created)


# --------------------------------------------------------------------------- overrides


def parse_overrides(lines: list[str], hydra) -> list:
    """Hydra's parsed overrides; a line it cannot parse is a :class:`UsageError` naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create(config_loader=hydra.config_loader)
    try:
        return parser.parse_overrides(lines)
    except OverrideParseException:
        for line in lines:
            try:
                parser.parse_overrides([line])
            except OverrideParseException as e:
                reason = str(e).splitlines()[0]
                raise UsageError(f"cannot read the override {line}: {reason}") from None
        raise


def sweep_values(override) -> list[str]:
    """The values of a swept key that are checked: every value of a list (or glob) sweep, the
    two ends of a range, none of an interval (a continuous search space)."""
    if not override.is_discrete_sweep():
        return []
    values = list(override.sweep_string_iterator())
    return values[:1] + values[-1:] if override.is_range_sweep() and values else values


def sweep_jobs(overrides: list) -> list[list[str]]:
    """Override lists to compose: the first job (each swept key at its first value, an
    interval left to the config), then one job per other value of each swept key."""
    fixed, swept = [], []
    for o in overrides:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif sweep_values(o):
            swept.append((o.get_key_element(), sweep_values(o)))
    first = fixed + [f"{key}={values[0]}" for key, values in swept]
    jobs = [first]
    for i, (key, values) in enumerate(swept):
        for value in values[1:]:
            jobs.append([*first[:len(fixed) + i], f"{key}={value}", *first[len(fixed) + i + 1:]])
    return jobs


def compose(hydra, config_name: str, job: list[str], overrides: list) -> DictConfig:
    """The job's config as Hydra composes it (with the ``hydra`` node); Hydra's errors become
    one line naming the key or option."""
    from hydra.errors import MissingConfigException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    try:
        return hydra.compose_config(config_name, job, run_mode=RunMode.MULTIRUN,
                                    validate_sweep_overrides=False)
    except MissingConfigException as e:
        raise UsageError(missing_option(e, overrides)) from None
    except Exception as e:  # noqa: BLE001 - Hydra's, OmegaConf's and ValueErrors of values
        from hydra.errors import HydraException

        if not isinstance(e, (HydraException, OmegaConfBaseException, ValueError)):
            raise
        unknown = re.match(r"Could not override '([^']+)'", str(e))
        if unknown:
            raise UsageError(unknown_key(hydra, config_name, job, unknown[1])) from None
        twice = re.match(r"Multiple values for ([\w/.]*\w)", str(e))
        if twice:
            raise UsageError(f"+{twice[1]}=...: {twice[1]} is chosen already; write "
                             f"{twice[1]}=<option> (without +)") from None
        raise UsageError(" ".join(str(e).split("\n")[0].split())) from None


def missing_option(e, overrides: list) -> str:
    """``method=fats: no such option; choose from ... (did you mean fast?)``."""
    missing = str(getattr(e, "missing_cfg_file", "") or "")
    for o in overrides:
        group = o.key_or_group
        if not o.is_sweep_override() and f"{group}/{o.value()}" == missing:
            break
    else:
        group = missing.rpartition("/")[0]
    option = missing.removeprefix(f"{group}/")
    if not group:
        return f"no config named {missing}"
    choices = options(group) if (CONF_DIR / group).is_dir() else list(e.options or [])
    close = difflib.get_close_matches(option, choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if len(choices) > MAX_LISTED:
        shown = difflib.get_close_matches(option, choices, n=MAX_LISTED // 4, cutoff=0.0)
        return (f"{group}={option}: no such option; {len(choices)} options under "
                f"fastcert/conf/{group}, e.g. {', '.join(shown)}{hint}")
    return f"{group}={option}: no such option; choose from {', '.join(choices)}{hint}"


def unknown_key(hydra, config_name: str, job: list[str], key: str) -> str:
    """``unknown key epoch; did you mean epochs?``: the first part of ``key`` the config does
    not have, with the nearest key beside it (from the config composed without the failing
    override)."""
    from hydra.types import RunMode

    rest = [line for line in job if not re.match(rf"[+~]*{re.escape(key)}=", line)]
    try:
        cfg = hydra.compose_config(config_name, rest, run_mode=RunMode.MULTIRUN,
                                   validate_sweep_overrides=False)
    except Exception:  # noqa: BLE001 - another mistake: name this key alone
        return f"unknown key {key}"
    parts, node = key.split("."), task_config(cfg)
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        where = ".".join(parts[:i])
        known = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(part, known, n=1, cutoff=0.5)
        prefix = f"{where}." if where else ""
        name = f"{prefix}{part}"
        if close:
            return f"unknown key {name}; did you mean {prefix}{close[0]}?"
        owner = f"the keys of {where}" if where else "the top-level keys"
        return f"unknown key {name}; {owner} are {', '.join(known)}"
    return f"unknown key {key}"


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config without the ``hydra`` node (what the task function receives)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in the job
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return task


# --------------------------------------------------------------------------- run dir


def check_run(task: DictConfig, run_dir: Path) -> None:
    """A single run's resume, checked against its run dir (on the CPU: the device is taken
    in the job)."""
    import torch

    from fastcert.resume import check_resume

    resolved = OmegaConf.to_container(task, resolve=True)
    check_resume(task, resolved, run_dir, None, torch.device("cpu"))


def output_dir(cfg: DictConfig, key: str) -> tuple[Path, list[Path], bool]:
    """The run's (``hydra.run.dir``) or sweep's (``hydra.sweep.dir``) dir, created: claimed
    under a free name where the name is timestamped, else as given. Returns the dir, the
    directories created, and whether it was claimed (then it is passed to Hydra). In a
    torchrun launch rank 0 claims and the other ranks take its dir."""
    raw = str(OmegaConf.to_container(cfg.hydra, resolve=False)[key.split(".")[1]]["dir"])
    natural = Path(str(OmegaConf.select(cfg, key)))
    timestamped = "${now:" in raw
    ctx = distributed.current()
    if ctx is not None and not ctx.main:
        got = distributed.broadcast(None) if timestamped else str(natural)
        if got.startswith("error: "):
            raise UsageError(got.removeprefix("error: "))
        return Path(got), [], timestamped
    try:
        if timestamped:
            out, created = rundir.claim(natural)
        else:
            out, created = natural, rundir.create(natural)
    except OSError as e:
        problem = (f"cannot create {key.split('.')[1]} dir {natural}: {e.strerror or e}; run "
                   f"from a writable directory or set {key}=<a writable path>")
        if ctx is not None and timestamped:
            distributed.broadcast(f"error: {problem}")
        raise UsageError(problem) from None
    if ctx is not None and timestamped:
        distributed.broadcast(str(out))
    if out != natural:
        print(f"{natural} was taken (another launch in the same second): this "
              f"{'sweep' if key == 'hydra.sweep.dir' else 'run'} is in {out}", flush=True)
    return out, created, timestamped


def quote(value: str) -> str:
    """``value`` as Hydra's override grammar reads it back unchanged."""
    if UNQUOTED.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
