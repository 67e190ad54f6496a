"""Continuing a run from its checkpoint, and refusing what would mix two runs.

A run directory holds one run. A fresh run refuses a directory that holds a checkpoint; a
resumed run (``resume.checkpoint=last``, ``auto`` or a path) refuses a config that differs from
the checkpoint's in what it trains (:data:`RESUME_GUARDED`), listing the differences, unless
``resume.allow_changes=true``, and ``epochs`` below the epochs the checkpoint has trained.
``epochs`` equal to them (a finished training) evaluates without training: how a run whose
final evaluation failed gets its results.json.

Every resume is kept in the run's record: ``resumed`` in last.pt and results.json is a list
of ``{from_epoch, changes, at}``, one per resume, appended and never overwritten.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fastcert import checkpoint
from fastcert.config import ConfigError, check_keys, coerce
from fastcert.train import read_metrics

#: What a resumed run may not change without ``resume.allow_changes=true``: what is trained.
RESUME_GUARDED = ("model", "data", "method", "seed", "eps", "schedule", "optim")
#: Keys inside :data:`RESUME_GUARDED` that say only where data lives or how it is tested.
RESUME_FREE = ("data.root", "data.download", "data.num_workers", "data.test_batch_size",
               "data.limit_test", "data.on_device", "data.source.root", "data.source.download",
               "data.source.num_workers")
#: The keys of the ``resume`` node.
RESUME_KEYS = ("checkpoint", "allow_changes")


def resume_options(cfg: DictConfig) -> tuple[str | None, bool]:
    """``resume.checkpoint`` (null: a fresh run; ``last``: the run dir's last.pt; or a path)
    and ``resume.allow_changes``, checked."""
    node = cfg.get("resume")
    if node is None:
        return None, False
    if not isinstance(node, DictConfig):
        raise ConfigError(f"resume={node}: resume is a group of keys; continue a run with "
                          f"resume.checkpoint=last (this run dir's last.pt) or "
                          f"resume.checkpoint=PATH")
    check_keys(list(node), RESUME_KEYS, "resume")
    checkpoint_path = node.get("checkpoint")
    return (None if checkpoint_path is None else str(checkpoint_path),
            coerce(node.get("allow_changes", False), bool, "resume.allow_changes"))


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for the keys of :data:`RESUME_GUARDED` (but not
    :data:`RESUME_FREE`) where two resolved run configs differ."""
    a, b = {}, {}
    for key in RESUME_GUARDED:
        a.update(_flat(old.get(key), key))
        b.update(_flat(new.get(key), key))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUME_FREE}


@dataclass
class Resume:
    """Where a run starts: the loaded checkpoint (None: a fresh run), the ``resumed`` record
    of results.json, the metrics up to the checkpoint and the wall time it had used."""

    state: dict | None = None
    resumed: list[dict] | None = None
    history: list[dict] = field(default_factory=list)
    previous_wall_s: float = 0.0
    path: Path | None = None
    done: dict | None = None  # ``auto`` on a finished run: its results.json, nothing to do

    @property
    def epoch(self) -> int:
        """The epochs the checkpoint has trained (0: a fresh run)."""
        return 0 if self.state is None else int(self.state["epoch"])

    def first_in(self, run_dir: Path) -> bool:
        """Whether this run writes the first files of ``run_dir``: a fresh run, or one
        continuing another dir's checkpoint (a requeued trial of a search)."""
        return self.state is None or Path(self.path).resolve().parent != Path(run_dir).resolve()


def check_resume(cfg: DictConfig, resolved: dict, run_dir: Path, resume,
                 device: torch.device) -> Resume:
    """The checkpoint to continue from, checked (``resume``: as :func:`load_state` takes it;
    None: ``cfg.resume.checkpoint``). Refused: a fresh run into a run dir holding a checkpoint
    (CheckpointError); a resume whose config differs from the checkpoint's in what it trains
    (:data:`RESUME_GUARDED`) without ``resume.allow_changes``, or whose ``epochs`` is below
    the checkpoint's epoch (ConfigError)."""
    checkpoint_path, allow_changes = resume_options(cfg)
    resume = checkpoint_path if resume is None else resume
    path = checkpoint_file(run_dir, resume)
    state = load_state(run_dir, resume, device)
    if state is None:
        return Resume()
    epoch, epochs = int(state["epoch"]), coerce(cfg.epochs, int, "epochs")
    if epochs < epoch:
        raise ConfigError(
            f"epochs={epochs} is below the {epoch} epochs {path} has trained: resume with "
            f"epochs={epoch} (evaluates the trained model) or more (trains on to that epoch)")
    changes = config_changes(state.get("config") or {}, resolved)
    if changes and not allow_changes:
        raise ConfigError(
            f"resume: this config differs from the one that trained the checkpoint (epoch "
            f"{epoch}) in what it trains:\n"
            + "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            + "\nResuming would mix two runs. Start the new config in another "
              "hydra.run.dir, or force it with resume.allow_changes=true (recorded in "
              "results.json)")
    history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["epoch"] <= epoch]
    previous_wall = float(state.get("wall_time_s", sum(r["epoch_time_s"] for r in history)))
    done = finished_results(run_dir, epoch) if resume == "auto" and epoch == epochs else None
    record = [*earlier_resumes(state, run_dir),
              {"from_epoch": epoch, "changes": {k: list(v) for k, v in changes.items()},
               "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}]
    return Resume(state, record, history, previous_wall, path, done)


def earlier_resumes(state: dict, run_dir: Path) -> list[dict]:
    """The resumes before this one: the longer of the checkpoint's record and results.json's
    (each is the record as it stood when it was written, so the longer is the later; a resume
    that only evaluated wrote results.json, not last.pt)."""
    in_checkpoint = list(state.get("resumed") or [])
    results = run_dir / "results.json"
    written = json.loads(results.read_text()).get("resumed") if results.is_file() else None
    written = [written] if isinstance(written, dict) else list(written or [])
    return written if len(written) > len(in_checkpoint) else in_checkpoint


def finished_results(run_dir: Path, epoch: int) -> dict | None:
    """The run dir's results.json where it describes the finished checkpoint (``epoch``
    epochs), else None."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("epochs") == epoch else None


def checkpoint_file(run_dir: Path, resume) -> Path | None:
    """The checkpoint ``resume`` names: None/false: none (a fresh run); true, ``last`` or
    ``auto``: the run dir's last.pt; else the path."""
    if resume in (None, False, "false", "False"):
        return None
    if resume in (True, "true", "True", "last", "auto"):
        return run_dir / "last.pt"
    return Path(resume)


def load_state(run_dir: Path, resume, device: torch.device) -> dict | None:
    """The checkpoint to continue from. ``resume``: None/false (a fresh run), true or
    ``"last"`` (this run dir's last.pt), ``"auto"`` (last.pt where the run dir holds one,
    else a fresh run) or a path. A fresh run never overwrites a run dir that holds a
    checkpoint."""
    path = checkpoint_file(run_dir, resume)
    if path is None or (resume == "auto" and not path.exists()):
        if (run_dir / "last.pt").exists():
            raise checkpoint.CheckpointError(
                f"{run_dir} already holds a run (last.pt); nothing was changed. Continue it with "
                f"resume.checkpoint=last, or start a new run in another hydra.run.dir")
        return None
    if not path.exists():
        raise checkpoint.CheckpointError(
            f"resume: no checkpoint at {path}. Run with hydra.run.dir=<the old run dir> "
            f"resume.checkpoint=last, or resume.checkpoint=<path to last.pt>")
    return checkpoint.load(path, map_location=device)


def check_weights(state: dict, model: torch.nn.Module, changes: dict) -> None:
    """The checkpoint's weights must fit ``model`` (same parameter names and shapes);
    ``resume.allow_changes`` may change how a model is trained, not its architecture."""
    own = model.state_dict()
    saved = state["model"]
    differ = [f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
              for k in own if k in saved and saved[k].shape != own[k].shape]
    differ += [f"{k}: not in the checkpoint" for k in own if k not in saved]
    differ += [f"{k}: not in this model" for k in saved if k not in own]
    if differ:
        model_changes = ", ".join(f"{k}={new!r} (was {old!r})" for k, (old, new) in
                                  changes.items() if k.startswith("model."))
        raise checkpoint.CheckpointError(
            f"the checkpoint's weights do not fit this model ({differ[0]}"
            f"{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}): "
            f"{model_changes or 'the model config'} changes the architecture, which a resume "
            f"cannot; drop those overrides, or train the new model in another hydra.run.dir")
