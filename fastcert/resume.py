"""Continuing a run from its checkpoint, and refusing what would mix two runs.

A run directory holds one run. A fresh run refuses a directory that holds a checkpoint; a
resumed run (``resume.checkpoint=last`` or a path) refuses a config that differs from the
checkpoint's in what it trains (:data:`RESUME_GUARDED`), listing the differences, unless
``resume.allow_changes=true`` (then the differences are recorded in results.json).
"""
from __future__ import annotations

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
    resumed: dict | None = None
    history: list[dict] = field(default_factory=list)
    previous_wall_s: float = 0.0


def check_resume(cfg: DictConfig, resolved: dict, run_dir: Path, resume,
                 device: torch.device) -> Resume:
    """The checkpoint to continue from, checked (``resume``: as :func:`load_state` takes it;
    None: ``cfg.resume.checkpoint``). A fresh run into a run dir holding a checkpoint, or a
    resume whose config differs from the checkpoint's in what it trains
    (:data:`RESUME_GUARDED`) without ``resume.allow_changes``, is refused (ConfigError)."""
    checkpoint_path, allow_changes = resume_options(cfg)
    state = load_state(run_dir, checkpoint_path if resume is None else resume, device)
    if state is None:
        return Resume()
    changes = config_changes(state.get("config") or {}, resolved)
    if changes and not allow_changes:
        raise ConfigError(
            f"resume: this config differs from the one that trained the checkpoint (epoch "
            f"{state['epoch']}) in what it trains:\n"
            + "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            + "\nResuming would mix two runs. Start the new config in another "
              "hydra.run.dir, or force it with resume.allow_changes=true (recorded in "
              "results.json)")
    resumed = {"from_epoch": int(state["epoch"]),
               "changes": {k: list(v) for k, v in changes.items()}}
    history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["epoch"] <= state["epoch"]]
    previous_wall = float(state.get("wall_time_s", sum(r["epoch_time_s"] for r in history)))
    return Resume(state, resumed, history, previous_wall)


def load_state(run_dir: Path, resume, device: torch.device) -> dict | None:
    """The checkpoint to continue from. ``resume``: None/false (a fresh run), true or
    ``"last"`` (this run dir's last.pt) or a path. A fresh run never overwrites a run dir that
    holds a checkpoint."""
    if resume in (None, False, "false", "False"):
        if (run_dir / "last.pt").exists():
            raise checkpoint.CheckpointError(
                f"{run_dir} already holds a run (last.pt); nothing was changed. Continue it with "
                f"resume.checkpoint=last, or start a new run in another hydra.run.dir")
        return None
    path = run_dir / "last.pt" if resume in (True, "true", "True", "last") else Path(resume)
    if not path.exists():
        raise checkpoint.CheckpointError(
            f"resume: no checkpoint at {path}. Run with hydra.run.dir=<the old run dir> "
            f"resume.checkpoint=last, or resume.checkpoint=<path to last.pt>")
    return checkpoint.load(path, map_location=device)
