"""``logger=wandb``: Weights & Biases through the real ``wandb`` library.

What is logged (conf/logger/wandb.yaml has the options):

* the resolved config (``wandb.init(config=...)``);
* per-step training scalars every ``log_every`` batches under ``train/`` (loss and its parts,
  ε, λ, κ/β, LR, gradient norm) against ``global_step``;
* per-epoch records under ``epoch/`` against ``epoch``: the metrics.jsonl record, with per-layer
  lists (ReLU-state ratios) split into one scalar per layer and the epoch time repeated under
  ``epoch/phase_time_s/<phase>`` so each ε phase gets its own curve;
* the final results as the run summary, diagnostic PNGs as images under ``figures/``, and
  (``log_checkpoints: true``) last.pt as a ``model`` artifact.

Every row is logged at an explicit W&B step, the optimiser step: ``global_step`` for per-step
rows, ``epoch × steps_per_epoch`` (the steps done) for epoch rows. So a resumed run continues
the same step axis instead of restarting at 0.

The run name is ``pipeline.run_name`` (``fast-cnn7-cifar10-s1``); the group defaults to the
experiment preset's name. The run id is stored in ``<run dir>/wandb_run_id`` and in each
checkpoint, so a resumed run (``resume.checkpoint=last``) continues the same W&B run; the
pipeline then logs again the epochs up to the checkpoint from metrics.jsonl (a SIGKILLed
offline run may not have written them), and W&B keeps the rows it already has (an epoch row
below the run's current step is not sent again). A run stopped by SIGTERM / SIGINT is marked
preempting (``run.mark_preempting()``) and finishes with exit code 1. ``mode`` is
online | offline | disabled; when unset it is ``$WANDB_MODE``, else online; without a login,
online mode is refused with a message saying how to log in or run offline.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import wandb

from fastcert.checkpoint import write_text_atomic
from fastcert.config import ConfigError
from fastcert.loggers import Logger

MODES = ("online", "offline", "disabled", "shared")
_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older spellings of WANDB_MODE
ID_FILE = "wandb_run_id"


def resolve_mode(mode: str | None) -> str:
    """``mode`` (or ``$WANDB_MODE`` when unset), checked against the modes wandb accepts."""
    value = mode if mode not in (None, "") else os.environ.get("WANDB_MODE") or "online"
    value = _ALIASES.get(str(value).lower(), str(value).lower())
    if value not in MODES:
        raise ValueError(f"logger.mode={value!r} is not a W&B mode; use one of "
                         f"online, offline, disabled (or set WANDB_MODE)")
    return value


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts → ``a/b`` keys, lists → ``key/layer<i>`` scalars, other objects → str."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(f"{key}/", v))
        elif isinstance(v, (list, tuple)):
            out.update({f"{key}/layer{i}": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float, bool, str)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


class WandbLogger(Logger):
    def __init__(self, *, run_dir, run_name: str, config: dict, project: str = "fastcert",
                 entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None,
                 mode: str | None = None, log_every: int = 50, log_checkpoints: bool = False,
                 resume_id: str | None = None, group_default: str | None = None,
                 steps_per_epoch: int = 0):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = resolve_mode(mode)
        id_file = run_dir / ID_FILE
        if resume_id is None and id_file.exists():
            # Same run dir, same W&B run: also covers a checkpoint written without an id.
            resume_id = id_file.read_text().strip() or None
        if isinstance(tags, str):
            tags = [tags]
        self.log_checkpoints = bool(log_checkpoints)
        self.log_every = int(log_every or 0)
        self.run_dir = run_dir
        self.steps_per_epoch = int(steps_per_epoch)
        self.exit_code = 0
        try:
            self.run = wandb.init(
                project=project, entity=entity, group=group or group_default or None,
                tags=[str(t) for t in (tags or [])], mode=mode, name=run_name, config=config,
                dir=str(run_dir), id=resume_id, resume="allow" if resume_id else None,
                reinit="finish_previous")
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:
            raise ConfigError(
                f"logger=wandb: W&B cannot log online ({e}). Log in with `wandb login` (or "
                f"set WANDB_API_KEY), or log offline with logger.mode=offline (or "
                f"WANDB_MODE=offline; upload later with `wandb sync {run_dir}/wandb/"
                f"offline-run-*`), or run without W&B: logger=none") from None
        self.run_id = self.run.id
        if mode != "disabled":
            write_text_atomic(id_file, self.run_id)
        self.run.define_metric("global_step")
        self.run.define_metric("train/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log_step(self, metrics, step):
        self.run.log({**flatten("", metrics), "global_step": int(step)}, step=int(step))

    def log_epoch(self, metrics, epoch):
        # the optimiser steps done by the end of the epoch (without steps_per_epoch, as when
        # the logger is used on its own: W&B's own counter)
        step = int(epoch) * self.steps_per_epoch if self.steps_per_epoch else None
        if step is not None and step < self.run.step:
            return  # this W&B run already has it (a resumed online run)
        row = flatten("epoch/", {k: v for k, v in metrics.items() if k != "epoch"})
        phase, seconds = metrics.get("phase"), metrics.get("epoch_time_s")
        if phase is not None and seconds is not None:
            row[f"epoch/phase_time_s/{phase}"] = seconds
        self.run.log({**row, "epoch": int(epoch)}, step=step)

    def log_summary(self, results):
        self.run.summary.update(flatten("", results))
        self.log_images(_diagnostic_plots(self.run_dir))

    def log_images(self, images):
        found = {name: Path(p) for name, p in images.items() if Path(p).is_file()}
        if found:
            self.run.log({f"figures/{name}": wandb.Image(str(p), caption=p.name)
                          for name, p in found.items()})

    def log_checkpoint(self, path):
        if self.log_checkpoints and Path(path).is_file():
            art = wandb.Artifact(f"checkpoint-{self.run.id}", type="model",
                                 metadata={"file": Path(path).name})
            art.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(art, aliases=["latest"])

    def mark_preempting(self):
        self.run.mark_preempting()
        self.exit_code = 1

    def finish(self):
        self.run.finish(exit_code=self.exit_code)


def _diagnostic_plots(run_dir: Path) -> dict[str, str]:
    """Draw the run's diagnostic PNGs (:mod:`fastcert.plots`) for W&B; a plot never fails a run."""
    try:
        from fastcert.plots import plot_run

        return {name: str(path) for name, (path, _) in plot_run(run_dir).items()}
    except Exception as e:  # noqa: BLE001 - plotting is a convenience at the edge
        print(f"warning: diagnostic plots skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return {}


