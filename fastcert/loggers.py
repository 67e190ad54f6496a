"""Experiment loggers: ``conf/logger/<name>.yaml`` names the class (``_target_``), which the
pipeline builds with the run's context (``run_dir``, ``run_name``, ``config``, ``resume_id``,
``group_default``, ``steps_per_epoch``). The core sees only this interface; the W&B logger lives in
:mod:`fastcert.wandb_logger` and is imported only when selected, so the training core never
imports ``wandb``.
"""
from __future__ import annotations

from typing import Any


class Logger:
    """Receives what a run produces. Every method is optional to implement. ``log_every``:
    per-step scalars every this many batches (0: never)."""

    run_id: str | None = None
    log_every: int = 0

    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_step(self, metrics: dict[str, float], step: int) -> None: ...
    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None: ...
    def log_summary(self, results: dict[str, Any]) -> None: ...
    def log_images(self, images: dict[str, str]) -> None: ...
    def log_checkpoint(self, path: str) -> None: ...
    def mark_preempting(self) -> None: ...
    def finish(self) -> None: ...


class NullLogger(Logger):
    """``logger=none``: the run dir's metrics.jsonl and results.json are the record."""

    def __init__(self, log_every: int = 0, run_dir=None, run_name: str = "",
                 config: dict | None = None, resume_id: str | None = None,
                 group_default: str | None = None, steps_per_epoch: int = 0):
        self.log_every = int(log_every)
