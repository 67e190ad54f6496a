"""Model selection (``select``): keep the epoch whose model scores best on a held-out split,
as CTBench keeps the epoch of best robust accuracy (``--model-selection robust_accu``,
``mix_train.py``). :class:`Select` is the config node, :class:`Selector` the run's state."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastcert import checkpoint
from fastcert.bounds import Bound

#: What results.json records, and the run prints, when the test set chooses the model.
TEST_SPLIT_WARNING = (
    "select.split=test: the kept epoch is chosen by its accuracy on the test set, as CTBench's "
    "published runs were; the test accuracies of this run are then biased upward. For an "
    "unbiased estimate select on a validation split: select.split=val data.val_size=0.1")


@dataclass(frozen=True)
class Select:
    """``select``: after every eligible epoch the model is evaluated on ``split`` (``val``:
    the validation split held out of the training set, ``data.val_size``; ``test``: the test
    set, CTBench's reproduction, warned about and recorded) at the test radius with the
    run's final evaluation (:func:`fastcert.evaluate.evaluate`, ``eval.pgd``, sound bounds
    only) and ``metric`` read from it (a results.json accuracy key: ``clean_acc``,
    ``pgd_acc``, ``<verifier>_verified_acc``, ``any_verified_acc``); null: no selection, the
    last model is kept.

    Eligible epochs, as CTBench's: those whose last step trained at ε ≥ the test radius
    (with a training ε above the test ε, from inside the ramp). The kept epoch is the first
    with the highest value (a later epoch must be strictly better); its weights are written to
    ``best.pt`` beside ``last.pt`` when it is found, the final evaluation runs on them, and
    results.json's ``selection`` says which epoch was kept, on which split, and its value.
    When no epoch is eligible the last model is kept (and recorded so)."""

    metric: str | None = None
    split: Literal["val", "test"] = "val"

    def __post_init__(self):
        if self.metric is None or self.metric in ("clean_acc", "pgd_acc", "any_verified_acc"):
            return
        try:
            Bound.parse(self.metric.removesuffix("_verified_acc"))
            if not self.metric.endswith("_verified_acc"):
                raise ValueError
        except ValueError:
            raise ValueError(f"select.metric={self.metric}: choose clean_acc, pgd_acc, "
                             f"ibp_verified_acc, crown_ibp_verified_acc, crown_verified_acc, "
                             f"alpha_crown_verified_acc, any_verified_acc (or null: keep the "
                             f"last model)") from None

    @property
    def on(self) -> bool:
        return self.metric is not None

    def verifiers(self, eval_verifiers: list[str]) -> list[str]:
        """The verifiers an evaluation for ``metric`` needs: its own, ``eval_verifiers`` for
        ``any_verified_acc``, none for the clean and PGD accuracies."""
        if self.metric == "any_verified_acc":
            return list(eval_verifiers)
        if self.metric.endswith("_verified_acc"):
            return [self.metric[:-len("_verified_acc")]]
        return []

    def warn(self) -> None:
        if self.on and self.split == "test":
            warnings.warn(TEST_SPLIT_WARNING, stacklevel=2)


class Selector:
    """A run's selection state: each eligible epoch's value, the best so far, and best.pt.

    ``evaluate()`` scores the current model (a dict of accuracies), ``eligible(epoch)`` says
    whether an epoch (0-based) competes, ``extra()`` is what best.pt holds besides the model
    and its epoch (the run config); ``write``: this process writes best.pt (rank 0)."""

    def __init__(self, cfg: Select, evaluate: Callable[[], dict],
                 eligible: Callable[[int], bool], run_dir: Path,
                 extra: Callable[[], dict] | None = None, write: bool = True):
        self.cfg, self.evaluate, self.eligible = cfg, evaluate, eligible
        self.path = Path(run_dir) / "best.pt"
        self.extra, self.write = extra, write
        self.best_epoch: int | None = None   # 1-based, as metrics.jsonl counts
        self.best_value: float | None = None
        self.eligible_epochs = 0

    def after_epoch(self, model: torch.nn.Module, epoch: int) -> dict:
        """Score the model after epoch ``epoch`` (0-based) when eligible, keeping it in
        best.pt when it beats every earlier one; the epoch's record values."""
        if not self.eligible(epoch):
            return {}
        value = self.evaluate()[self.cfg.metric]
        self.eligible_epochs += 1
        if self.best_value is None or value > self.best_value:
            self.best_epoch, self.best_value = epoch + 1, value
            if self.write:
                checkpoint.save_atomic(
                    {"model": model.state_dict(), "epoch": epoch + 1,
                     "selection": self.summary(), **(self.extra() if self.extra else {})},
                    self.path)
        return {f"select/{self.cfg.metric}": value}

    def summary(self) -> dict:
        """results.json's ``selection``."""
        out = {"metric": self.cfg.metric, "split": self.cfg.split, "epoch": self.best_epoch,
               "value": self.best_value, "eligible_epochs": self.eligible_epochs,
               "kept": "best.pt" if self.best_epoch is not None else "last.pt (no eligible "
                                                                      "epoch)"}
        if self.cfg.split == "test":
            out["warning"] = TEST_SPLIT_WARNING
        return out

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value,
                "eligible_epochs": self.eligible_epochs}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.best_epoch = state.get("best_epoch")
        self.best_value = state.get("best_value")
        self.eligible_epochs = state.get("eligible_epochs", 0)
