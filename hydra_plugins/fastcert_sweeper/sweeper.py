"""``hydra/sweeper=fastcert``: an Optuna study (one or several objectives) driven through
``study.ask`` / ``study.tell``, every trial an ordinary job of Hydra's launcher (basic, joblib,
submitit ...), in ``<sweep dir>/trial_<N>``.

One launch:

1. the search space (:mod:`fastcert.sweep.space`) with the command line folded in;
2. the study ``study_name`` in ``storage`` (:mod:`fastcert.study`; SQLite by default),
   created or loaded (several launchers may create it at once); a loaded study must have the
   same directions and have been launched with the same settings (the task config outside the
   swept keys, the per-run keys of ``override_dirname.exclude_keys`` aside);
3. stale trials of dead launchers failed and requeued (:mod:`fastcert.sweep.trials`);
4. until the study holds ``n_trials`` counted trials: ask a batch of ``n_jobs`` trials (the
   sampler, e.g. TPE with constant liar, sees the running ones), launch them, tell each its
   outcome: COMPLETE with the task's return values (``optimized_metric``: one number per
   direction), PRUNED when the run stopped early (results.json ``stopped_early``), FAIL when
   the job raised or returned no valid values. Before telling, the trial gets the user
   attributes ``metrics`` (the accuracies of its results.json, validation and test) and
   ``constraints`` (CTRAIN's ``minimum − value`` per key of ``constraints``), which the
   sampler's ``constraints_func`` reads;
5. ``<sweep dir>/optimization_results.yaml`` (the best trial, or the front) and the ``report``
   hook (the pareto presets: :func:`experiments.pareto.report_sweep`).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, ListConfig, OmegaConf

from fastcert.sweep import trials as T
from fastcert.sweep.space import Space, SpaceError

log = logging.getLogger(__name__)

#: Study user attributes that pin a study to the settings it was created with.
STUDY_CONFIG, STUDY_OBJECTIVE = "fastcert:config", "fastcert:objective"


def quote(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_constraints(trial, n: int) -> list[float]:
    """The sampler's ``constraints_func``: the values the sweeper stored (infeasible by 1
    where none were: a run that wrote no results)."""
    return list(trial.user_attrs.get(T.CONSTRAINTS) or [1.0] * n)


def flat_config(config: DictConfig, exclude: Sequence[str]) -> dict[str, Any]:
    """The task config (no ``hydra``, no ``search``) resolved and flattened to dotted keys,
    without ``exclude`` and the keys under them."""
    node = OmegaConf.masked_copy(config, [k for k in config if k not in ("hydra", "search")])
    try:
        data = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation of the launch's runtime: compare as written
        data = OmegaConf.to_container(node, resolve=False)
    out: dict[str, Any] = {}

    def walk(value, prefix):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not any(prefix == e or prefix.startswith(e + ".") for e in exclude):
            out[prefix] = value

    walk(data, "")
    return out


def _tell_once(study, trial, state, values=None) -> str:
    """Tell ``trial`` its state; the name of the state told (FAIL where another launcher had
    already failed it as stale: its heartbeat lapsed)."""
    try:
        study.tell(trial, values, state=state)
    except (RuntimeError, ValueError) as e:
        log.warning(f"trial {trial.number}: not told {state.name} ({e})")
        return "FAIL"
    return state.name


class FastcertOptunaSweeper(Sweeper):
    """The sweeper of ``conf/hydra/sweeper/fastcert.yaml`` (its comments list the keys)."""

    def __init__(self, study_name: str, direction: Any = "maximize", n_trials: int = 20,
                 n_jobs: int = 1, storage: str | None = "sqlite", sampler: Any = None,
                 params: Any = None, branch: Any = None, constraints: Any = None,
                 max_failure_rate: float = 0.0, heartbeat_s: float = 60.0,
                 stale_after_s: float = 600.0, report: str | None = None):
        self.study_name = str(study_name)
        several = isinstance(direction, (list, tuple, ListConfig))
        self.directions = [str(d) for d in direction] if several else [str(direction)]
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.storage, self.sampler_cfg = storage, sampler
        self.params, self.branch = params, branch
        self.constraints = {str(k): float(v) for k, v in (constraints or {}).items()}
        self.max_failure_rate = float(max_failure_rate)
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.report = report
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------------ preparation

    def sweep(self, arguments: list[str]) -> Any:
        from fastcert.cli import exit_on_known_errors

        with exit_on_known_errors():
            study, space, fixed, url = self._prepare(list(arguments))
        self._run(study, space, fixed, url)
        self._finish(study, url)
        return study

    def _prepare(self, arguments: list[str]):
        from fastcert.config import ConfigError
        from fastcert.study import open_study, storage_url

        try:
            space = Space.from_config(self.params, self.branch)
            fixed = space.apply_command_line(arguments)
        except SpaceError as e:
            raise ConfigError(str(e)) from None
        self._check_objective()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            url = storage_url(self.storage, sweep_dir)
        except ValueError as e:
            raise ConfigError(f"hydra.sweeper.{e}") from None
        study = open_study(self.study_name, url, self.directions)
        self._check_study(study, url)
        study.sampler = self._sampler(len(study.trials))
        for number, reason in T.requeue_stale(study, self.stale_after_s):
            log.info(f"trial {number} was left running ({reason}): failed and requeued")
        log.info(f"study {self.study_name} in {url or 'memory'}: "
                 f"{len(T.counted(study.trials))} of {self.n_trials} trials")
        return study, space, fixed, url

    def _check_objective(self) -> None:
        """One ``optimized_metric`` key per direction (fastcert's task returns their values)."""
        from fastcert.config import ConfigError

        objective = OmegaConf.select(self.config, "optimized_metric")
        keys = ([] if objective is None else [objective] if isinstance(objective, str)
                else list(objective))
        if len(keys) != len(self.directions):
            raise ConfigError(
                f"optimized_metric={keys or None} names {len(keys)} results.json key(s) for "
                f"hydra.sweeper.direction={self.directions}: give one key per direction")

    def _check_study(self, study, url: str | None) -> None:
        """A loaded study must have this launch's directions and settings."""
        from fastcert.config import ConfigError

        have = [d.name.lower() for d in study.directions]
        if have != self.directions:
            raise ConfigError(f"study {self.study_name} in {url} optimises {have}, this launch "
                              f"{self.directions}: choose another hydra.sweeper.study_name")
        exclude = list(OmegaConf.select(
            self.config, "hydra.job.config.override_dirname.exclude_keys", default=[]) or [])
        mine = flat_config(self.config, exclude)
        objective = OmegaConf.to_container(OmegaConf.create(
            {"o": OmegaConf.select(self.config, "optimized_metric")}))["o"]
        before = study.user_attrs.get(STUDY_CONFIG)
        if before is None:
            study.set_user_attr(STUDY_CONFIG, mine)
            study.set_user_attr(STUDY_OBJECTIVE, objective)
            return
        changed = sorted(k for k in set(before) | set(mine) if before.get(k) != mine.get(k))
        if changed or study.user_attrs.get(STUDY_OBJECTIVE) != objective:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {mine.get(k)!r}" for k in changed[:6])
            raise ConfigError(
                f"study {self.study_name} in {url} was launched with other settings "
                f"({shown or 'optimized_metric'}): relaunch with the same overrides to add "
                f"trials, or start another study (hydra.sweeper.study_name=NAME)")

    def _sampler(self, n_existing: int):
        """The configured sampler; a fixed seed is offset by the trials already in the study
        (a relaunch does not replay the first launch's draws); ``constraints_func`` when there
        are constraints."""
        from hydra.utils import get_class, instantiate

        from fastcert.config import ConfigError

        cfg = (OmegaConf.to_container(self.sampler_cfg, resolve=True)
               if isinstance(self.sampler_cfg, DictConfig) else dict(self.sampler_cfg or {}))
        cls = get_class(cfg.pop("_target_", "optuna.samplers.TPESampler"))
        kwargs = {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v
                  for k, v in cfg.items()}
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + n_existing
        if self.constraints:
            kwargs["constraints_func"] = functools.partial(trial_constraints,
                                                           n=len(self.constraints))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"hydra.sweeper.sampler ({cls.__name__}): {e}; with "
                              f"hydra.sweeper.constraints use a sampler that takes them "
                              f"(hydra/sweeper/optuna_sampler=tpe, nsgaii or gp)") from None

    # ------------------------------------------------------------------ the trials

    def _run(self, study, space: Space, fixed: list[str], url: str | None) -> None:
        finished = failed = 0
        with T.Heartbeat(self.heartbeat_s) as beat:
            while True:
                remaining = self.n_trials - len(T.counted(study.get_trials(deepcopy=False)))
                if remaining <= 0:
                    break
                batch = self._ask(study, space, fixed, url, min(self.n_jobs, remaining))
                if not batch:
                    continue
                beat.watch([t for t, _ in batch])
                returns = self._launch(study, batch)
                beat.watch([])
                for (trial, _), ret in zip(batch, returns, strict=True):
                    state = self._tell(study, trial, ret)
                    finished += 1
                    failed += state == "FAIL"
                if failed / finished > self.max_failure_rate:
                    raise RuntimeError(
                        f"{failed} of the {finished} trials of this launch failed "
                        f"(hydra.sweeper.max_failure_rate={self.max_failure_rate}); the "
                        f"trials' run dirs have the errors")

    def _ask(self, study, space: Space, fixed: list[str], url: str | None, n: int):
        """Up to ``n`` trials with their overrides (a trial beyond the budget is discarded)."""
        from optuna.trial import TrialState

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        batch = []
        for _ in range(n):
            trial = study.ask()
            if T.over_budget(study, trial, self.n_trials):
                trial.set_user_attr(T.DISCARDED, "asked beyond n_trials")
                study.tell(trial, state=TrialState.FAIL)
                continue
            run_dir = sweep_dir / f"trial_{trial.number}"
            T.mark_mine(trial, run_dir)
            batch.append((trial, [*fixed, *space.sample(trial),
                                  *self._trial_overrides(trial, url)]))
        return batch

    def _trial_overrides(self, trial, url: str | None) -> list[str]:
        """The run dir ``trial_<N>``, the ``search`` node, and a requeued trial's resume."""
        out = [f"hydra.sweep.subdir=trial_{trial.number}"]
        if isinstance(OmegaConf.select(self.config, "search"), DictConfig):
            out += [f"search.study={quote(self.study_name)}",
                    f"search.storage={quote(url) if url else 'null'}",
                    f"search.trial={trial.number}"]
        resume = trial.user_attrs.get(T.RESUME_FROM)
        if resume:
            out.append(f"resume.checkpoint={quote(resume)}")
        return out

    def _launch(self, study, batch):
        """The batch through the launcher; if that raises (a config error stops every job,
        Ctrl-C), its trials are failed and discarded before the error goes on."""
        from optuna.trial import TrialState

        overrides = [o for _, o in batch]
        try:
            self.validate_batch_is_legal(overrides)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException as e:
            for trial, _ in batch:
                trial.set_user_attr(T.DISCARDED, f"the sweep stopped: {type(e).__name__}")
                study.tell(trial, state=TrialState.FAIL)
            raise
        self.job_idx += len(batch)
        return returns

    def _tell(self, study, trial, ret) -> str:
        """Tell ``trial`` the outcome of its job (module docstring, step 4)."""
        import json

        from optuna.trial import TrialState

        run_dir = Path(T.RUN_DIR in trial.user_attrs and trial.user_attrs[T.RUN_DIR] or ".")
        if ret.hydra_cfg is not None:
            run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        trial.set_user_attr(T.RUN_DIR, str(run_dir))
        path = run_dir / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        metrics = T.metrics_of(results)
        if metrics:
            trial.set_user_attr(T.METRICS, metrics)
        if self.constraints:
            trial.set_user_attr(T.CONSTRAINTS, T.constraint_values(self.constraints, metrics))
        try:
            values = T.objective_values(ret.return_value, len(self.directions))
        except Exception as e:  # noqa: BLE001 - the job's own error, or no valid values
            if not results.get("stopped_early"):
                trial.set_user_attr(T.ERROR, f"{type(e).__name__}: {e}"[:2000])
                return _tell_once(study, trial, TrialState.FAIL)
        if results.get("stopped_early"):
            return _tell_once(study, trial, TrialState.PRUNED)
        return _tell_once(study, trial, TrialState.COMPLETE, values)

    # ------------------------------------------------------------------ the end

    def _finish(self, study, url: str | None) -> None:
        """optimization_results.yaml and the report hook."""
        from hydra.utils import get_method
        from optuna.trial import TrialState

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        out: dict[str, Any] = {"name": "optuna", "study": self.study_name, "storage": url,
                               "n_trials": len(T.counted(study.trials))}
        if done and len(self.directions) == 1:
            out.update(best_params=study.best_trial.params, best_value=study.best_value,
                       best_trial=study.best_trial.number)
        elif done:
            out["solutions"] = [{"number": t.number, "params": t.params, "values": t.values}
                                for t in study.best_trials]
        (sweep_dir / "optimization_results.yaml").write_text(OmegaConf.to_yaml(out))
        log.info(f"{out['n_trials']} trials in study {self.study_name}; "
                 f"{sweep_dir / 'optimization_results.yaml'}")
        if self.report:
            get_method(self.report)(study=study, storage=url, sweep_dir=sweep_dir,
                                    config=self.config)
