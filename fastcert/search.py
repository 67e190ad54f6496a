"""A run as a trial of a search: the ``search`` node of the config, and fastcert's early
stopping of dominated trials.

The fastcert sweeper (``hydra/sweeper=fastcert``, docs/search.md) sets ``search.study``,
``search.storage`` and ``search.trial`` for every trial it launches; a run started by hand
leaves them null. The pareto presets add the inputs of their derived values to the same node
(``search.train_eps_factor``, ``search.kappa_end_factor``, ``search.lr_decay_1`` ...).

Early stopping of dominated trials (off by default). Optuna prunes single-objective trials
only (``Trial.report`` raises for several objectives), so a multi-objective search stops a
trial by its own rule: with ``search.stop_dominated = k > 0`` the run evaluates its validation
split once, at the end of the ε ramp (after epoch ``schedule.start + schedule.length``), and
stops there when at least k finished (COMPLETE) trials of its study dominate that point
shifted by ``search.stop_margin`` in every objective (:func:`fastcert.front.dominates`). Its
results.json then records ``stopped_early`` and the validation values at that epoch, the test
set is never read, and the sweeper tells the trial PRUNED. The rule compares a model at the
end of its ramp with finished models, which trained longer; the margin keeps trials that are
merely behind.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from fastcert.config import ConfigError, coerce
from fastcert.front import dominates

#: The keys of the ``search`` node that fastcert reads (the presets may add others).
KEYS = ("study", "storage", "trial", "stop_dominated", "stop_margin")
#: Prefix of the validation split's metrics in results.json.
VAL = "val_"


@dataclass(frozen=True)
class SearchSettings:
    """A trial's place in its study and the early-stopping rule (module docstring)."""

    study: str | None = None
    storage: str | None = None
    trial: int | None = None
    stop_dominated: int = 0
    stop_margin: float = 0.0


def search_settings(cfg: DictConfig, objective: list[str], val_size, nproc: int
                    ) -> SearchSettings:
    """The checked ``search`` node. Early stopping needs a trial of a stored study,
    objectives on the validation split (``optimized_metric`` = ``val_*`` keys, a
    ``data.val_size``) and one process (``nproc=1``)."""
    node = cfg.get("search") or {}
    s = SearchSettings(
        study=None if node.get("study") is None else str(node.get("study")),
        storage=None if node.get("storage") is None else str(node.get("storage")),
        trial=None if node.get("trial") is None else coerce(node.get("trial"), int,
                                                              "search.trial"),
        stop_dominated=coerce(node.get("stop_dominated", 0), int, "search.stop_dominated"),
        stop_margin=coerce(node.get("stop_margin", 0.0), float, "search.stop_margin"))
    if s.stop_dominated < 0 or s.stop_margin < 0:
        raise ConfigError(f"search.stop_dominated={s.stop_dominated}, search.stop_margin="
                          f"{s.stop_margin}: both must be >= 0 (stop_dominated=0: off)")
    if not s.stop_dominated:
        return s
    if s.study is None or s.storage is None:
        raise ConfigError("search.stop_dominated compares a trial with the finished trials "
                          "of its study: run it through a search (hparams_search=pareto/"
                          "<method>), or set search.stop_dominated=0")
    if not objective or not all(k.startswith(VAL) for k in objective) or not val_size:
        raise ConfigError(f"search.stop_dominated needs objectives on the validation split: "
                          f"optimized_metric={objective} must be val_* keys and data.val_size "
                          f"> 0 (e.g. optimized_metric=[val_clean_acc,val_any_verified_acc] "
                          f"data.val_size=0.2)")
    if nproc != 1:
        raise ConfigError(f"search.stop_dominated runs in one process: nproc={nproc}; use "
                          f"nproc=1 or search.stop_dominated=0")
    return s


def stop_epoch(start: int, length: int, epochs: int) -> int | None:
    """The epoch after which the rule looks: the end of the ε ramp, when training goes on
    after it (None: the ramp ends with the training, the final evaluation decides)."""
    end = int(start) + int(length)
    return end if 0 < end < epochs else None


@dataclass
class DominatedStop:
    """The rule of the module docstring for one run: ``objective`` are its ``val_*`` keys,
    ``epoch`` the end of its ramp."""

    settings: SearchSettings
    objective: list[str]
    epoch: int

    def dominating(self, point: list[float]) -> list[int]:
        """Numbers of the COMPLETE trials of the study whose values dominate ``point``
        shifted by the margin, in the study's directions."""
        from optuna.trial import TrialState

        from fastcert.study import open_study

        study = open_study(self.settings.study, self.settings.storage)
        directions = [d.name.lower() for d in study.directions]
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [t.number for t in finished
                if t.values is not None and len(t.values) == len(point)
                and dominates(t.values, point, directions, self.settings.stop_margin)]

    def record(self, point: list[float], by: list[int]) -> dict:
        """results.json's ``stopped_early`` entry."""
        return {"epoch": self.epoch, "values": dict(zip(self.objective, point)),
                "dominated_by": by, "margin": self.settings.stop_margin,
                "needed": self.settings.stop_dominated}


def dominated_stop(settings: SearchSettings, objective: list[str], start: int, length: int,
                   epochs: int) -> DominatedStop | None:
    """The run's rule, or None when it is off or the ramp ends with the training."""
    epoch = stop_epoch(start, length, epochs)
    if not settings.stop_dominated or epoch is None:
        return None
    return DominatedStop(settings, list(objective), epoch)
