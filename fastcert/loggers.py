"""Experiment loggers, chosen by ``logger=<name>``. The core sees only this interface.

The W&B logger lives in :mod:`fastcert.wandb_logger` and is imported only when selected, so
the training core never imports ``wandb``.
"""
from __future__ import annotations

import importlib
from typing import Any

LOGGERS = {
    "none": "fastcert.loggers:NullLogger",
    "wandb": "fastcert.wandb_logger:WandbLogger",
}


class Logger:
    """Receives what a run produces. Every method is optional to implement."""

    run_id: str | None = None

    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_step(self, metrics: dict[str, float], step: int) -> None: ...
    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None: ...
    def log_summary(self, results: dict[str, Any]) -> None: ...
    def log_images(self, images: dict[str, str]) -> None: ...
    def log_checkpoint(self, path: str) -> None: ...
    def finish(self) -> None: ...


class NullLogger(Logger):
    """``logger=none``: the run dir's metrics.jsonl and results.json are the record."""

    def __init__(self, **_: Any):
        pass


def create_logger(cfg: dict, **context: Any) -> Logger:
    """Instantiate the logger named by ``cfg['name']`` with the rest of ``cfg`` and ``context``
    (run_dir, run_name, resume_id, config)."""
    cfg = dict(cfg)
    name = cfg.pop("name", "none")
    if name not in LOGGERS:
        raise ValueError(f"unknown logger {name!r}; choose one of {sorted(LOGGERS)}")
    module, attr = LOGGERS[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(**cfg, **context)
