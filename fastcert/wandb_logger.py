"""``logger=wandb``: Weights & Biases through the real ``wandb`` library.

Step scalars are logged against ``global_step`` and epoch records against ``epoch`` (W&B's
``define_metric``), per-layer lists are split into one scalar per layer, the final results
become the run summary, and the run id is stored in the run dir (``wandb_run_id``) and in each
checkpoint so a resumed run continues the same W&B run. ``mode`` defaults to ``WANDB_MODE``
(offline works with no network).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wandb

from fastcert.loggers import Logger


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(f"{key}/", v))
        elif isinstance(v, (list, tuple)):
            out.update({f"{key}/layer{i}": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


class WandbLogger(Logger):
    def __init__(self, *, run_dir, run_name: str, config: dict, project: str = "fastcert",
                 entity: str | None = None, group: str | None = None, tags=(),
                 mode: str | None = None, log_every: int = 50, log_checkpoints: bool = False,
                 resume_id: str | None = None, group_default: str | None = None):
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        if resume_id is None and id_file.exists():
            resume_id = id_file.read_text().strip() or None
        self.log_checkpoints = log_checkpoints
        self.run = wandb.init(
            project=project, entity=entity, group=group or group_default, tags=list(tags or []),
            mode=mode or os.environ.get("WANDB_MODE") or "online", name=run_name,
            config=config, dir=str(run_dir), id=resume_id,
            resume="allow" if resume_id else None, reinit=True)
        self.run_id = self.run.id
        id_file.write_text(self.run_id)
        self.run.define_metric("global_step")
        self.run.define_metric("train/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log_step(self, metrics, step):
        self.run.log({**metrics, "global_step": step})

    def log_epoch(self, metrics, epoch):
        self.run.log({**_flatten("epoch/", metrics), "epoch": epoch})

    def log_summary(self, results):
        for k, v in _flatten("", results).items():
            self.run.summary[k] = v

    def log_images(self, images):
        self.run.log({f"figures/{name}": wandb.Image(str(path)) for name, path in images.items()})

    def log_checkpoint(self, path):
        if self.log_checkpoints:
            art = wandb.Artifact(f"{self.run.id}-checkpoint", type="model")
            art.add_file(str(path))
            self.run.log_artifact(art)

    def finish(self):
        self.run.finish()
