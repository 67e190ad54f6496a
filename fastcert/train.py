"""The training loop: batches → method.step → optimiser, per-epoch records and checkpoints.

It knows no method by name: whatever :class:`fastcert.methods.Method` is given turns a batch
into a loss. Each epoch reseeds the RNGs from (seed, epoch), so an epoch's data order and
augmentation are the same whether the run was resumed or not.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fastcert import checkpoint
from fastcert.bounds import BoundedNet
from fastcert.config import OptimConfig
from fastcert.loggers import Logger
from fastcert.methods import Batch, Method
from fastcert.regularizers import relu_states
from fastcert.schedules import EpsSchedule


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class TrainSetup:
    net: BoundedNet
    method: Method
    train_loader: object
    box_fn: Callable  # (x, eps) -> (lower, upper)
    schedule: EpsSchedule
    optim: OptimConfig
    epochs: int
    seed: int
    device: torch.device
    run_dir: Path
    logger: Logger
    log_every: int = 50
    checkpoint_extra: Callable[[], dict] | None = None  # more state to save (config, W&B id)


def make_optimizer(net: BoundedNet, cfg: OptimConfig):
    opt = torch.optim.Adam(net.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones),
                                                 gamma=cfg.gamma)
    return opt, sched


class _EpochStats:
    """Running means of the per-step numbers of one epoch."""

    def __init__(self):
        self.n = 0
        self.correct = 0
        self.verified = 0
        self.verified_n = 0
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.relu = defaultdict(list)

    def add(self, out, y, loss: float):
        b = len(y)
        self.n += b
        self.correct += (out.logits.argmax(1) == y).sum().item()
        if out.verified is not None:
            self.verified += out.verified.sum().item()
            self.verified_n += b
        for k, v in {"loss": loss, **out.stats}.items():
            self.sums[k] += v * b
            self.counts[k] += b
        if out.relus:
            for k, per_layer in relu_states(out.relus).items():
                self.relu[k].append(per_layer)

    def record(self) -> dict:
        rec = {k: self.sums[k] / self.counts[k] for k in self.sums}
        rec["train_clean_acc"] = self.correct / max(self.n, 1)
        if self.verified_n:
            rec["train_verified_acc"] = self.verified / self.verified_n
        for k, rows in self.relu.items():
            rec[f"relu_{k}"] = [sum(col) / len(col) for col in zip(*rows)]
        return rec


def fit(s: TrainSetup, resume_state: dict | None = None) -> list[dict]:
    """Train for ``s.epochs`` epochs, appending to metrics.jsonl and writing last.pt atomically
    after each. With ``resume_state`` (a loaded checkpoint), continue after the epoch it
    recorded."""
    optimizer, lr_sched = make_optimizer(s.net, s.optim)
    metrics_path = s.run_dir / "metrics.jsonl"
    ckpt_path = s.run_dir / "last.pt"
    start_epoch = 0
    if resume_state is not None:
        state = resume_state
        s.net.model.load_state_dict(state["model"])  # copies in place: views stay tied
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch = state["epoch"]
    # metrics.jsonl describes the run that wrote last.pt: drop epochs after the checkpoint
    # (written before a kill), or, on a fresh start, the record of a run killed before its
    # first checkpoint (the pipeline refuses a fresh start where a last.pt exists).
    history = _truncate_metrics(metrics_path, start_epoch)
    steps = len(s.train_loader)
    params = [p for p in s.net.model.parameters() if p.requires_grad]
    for epoch in range(start_epoch, s.epochs):
        seed_everything(epoch_seed(s.seed, epoch))
        generator = getattr(s.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(epoch_seed(s.seed, epoch))
        s.net.train()
        stats = _EpochStats()
        t0 = time.perf_counter()
        bar = tqdm(s.train_loader, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=1.0)
        optimizer.zero_grad(set_to_none=True)
        eps = 0.0
        for i, (x, y) in enumerate(bar):
            step = epoch * steps + i
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            eps = s.schedule.eps(step)
            lower, upper = s.box_fn(x, eps)
            out = s.method.step(s.net, Batch(x, y, lower, upper, eps, s.schedule.eps_target))
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, batch {i} "
                                         f"(eps={eps:.4g}); lower optim.lr or check the model")
            (loss / s.optim.grad_acc_steps).backward()
            grad_norm = None
            if (i + 1) % s.optim.grad_acc_steps == 0 or i + 1 == steps:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.optim.grad_clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stats.add(out, y, loss.item())
            if s.log_every and step % s.log_every == 0:
                s.logger.log_step({"train/loss": loss.item(), "train/eps": eps,
                                   "train/lr": optimizer.param_groups[0]["lr"],
                                   **({"train/grad_norm": grad_norm} if grad_norm is not None
                                      else {}),
                                   **{f"train/{k}": v for k, v in out.stats.items()}}, step)
            bar.set_postfix(eps=f"{eps:.4f}", loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        lr_sched.step()
        record = {"epoch": epoch + 1, "phase": s.schedule.phase(epoch), "eps": eps,
                  "lr": optimizer.param_groups[0]["lr"], **stats.record(),
                  "epoch_time_s": time.perf_counter() - t0}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
        state = {"model": s.net.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_sched.state_dict(), "epoch": epoch + 1,
                 "rng": checkpoint.rng_state(), **(s.checkpoint_extra() if s.checkpoint_extra
                                                    else {})}
        checkpoint.save_atomic(state, ckpt_path)
        s.logger.log_epoch(record, epoch + 1)
        tqdm.write(_epoch_line(record))
    return history


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch']:>3}", f"eps {r['eps']:.4f}", f"loss {r['loss']:.4f}",
             f"clean {r['train_clean_acc']:.3f}"]
    if "train_verified_acc" in r:
        parts.append(f"verified {r['train_verified_acc']:.3f}")
    parts.append(f"{r['epoch_time_s']:.1f}s")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when absent). A last line cut short (a run killed
    while writing it) is dropped; a bad line anywhere else is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}, is not JSON: {line[:80]!r}") from None
    return records


def _truncate_metrics(path: Path, last_epoch: int) -> list[dict]:
    """Keep only the records of epochs up to ``last_epoch`` (the checkpoint's) and a torn last
    line's removal, rewriting the file atomically; returns the kept records."""
    keep = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    if path.exists():
        checkpoint.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep


def epoch_times_by_phase(history: list[dict]) -> dict[str, float]:
    """Mean epoch time in each ε phase (the columns of Table 3 of Shi et al. 2021)."""
    out = {}
    for phase in ("eps0", "ramp", "final"):
        times = [r["epoch_time_s"] for r in history if r["phase"] == phase]
        if times:
            out[phase] = sum(times) / len(times)
    return out

