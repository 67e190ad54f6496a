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
from fastcert.loggers import Logger
from fastcert.methods import Batch, Method, StepOutput
from fastcert.optim import Optimizer
from fastcert.regularizers import relu_states
from fastcert.schedules import EpsSchedule


#: Evenly spaced steps per epoch whose plot-only values (ReLU states, regularisers) the epoch's
#: record averages (fewer when an epoch has fewer steps).
RECORD_STEPS = 8


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
    optim: Optimizer
    epochs: int
    seed: int
    device: torch.device
    run_dir: Path
    logger: Logger
    checkpoint_extra: Callable[[], dict] | None = None  # more state to save (config, W&B id)
    # measurements of the network after each epoch, added to its record (e.g. propagation
    # tightness on a fixed test batch); must leave the network, its gradients and the RNGs as
    # they were, so that a resumed run stays identical
    epoch_metrics: Callable[[BoundedNet], dict] | None = None


class _EpochStats:
    """Running sums of one epoch's per-step numbers, kept as tensors on the device and read
    once (:meth:`record`): no host-device synchronisation per step."""

    def __init__(self):
        self.n = 0
        self.correct = 0
        self.verified = 0
        self.verified_n = 0
        self.sums: dict = defaultdict(float)
        self.counts: dict = defaultdict(int)
        self.relu = defaultdict(list)

    def add(self, out: StepOutput, y: torch.Tensor, loss: torch.Tensor, diagnostics: bool):
        """One step; its plot-only values (regularisers, ReLU states) when ``diagnostics``."""
        b = len(y)
        self.n += b
        self.correct = self.correct + (out.logits.argmax(1) == y).sum()
        if out.verified is not None:
            self.verified = self.verified + out.verified.sum()
            self.verified_n += b
        values = {"loss": loss, **out.stats, **(out.diagnostics if diagnostics else {})}
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v * b
            self.counts[k] += b
        if diagnostics and out.relus:
            for k, per_layer in relu_states(out.relus).items():
                self.relu[k].append(per_layer)

    def record(self) -> dict:
        rec = {k: _number(self.sums[k]) / self.counts[k] for k in self.sums}
        rec["train_clean_acc"] = _number(self.correct) / max(self.n, 1)
        if self.verified_n:
            rec["train_verified_acc"] = _number(self.verified) / self.verified_n
        for k, rows in self.relu.items():
            rec[f"relu_{k}"] = [sum(col) / len(col) for col in zip(*rows)]
        return rec


def _number(v) -> float:
    return v.item() if isinstance(v, torch.Tensor) else float(v)


def _merge(outs: list[StepOutput]) -> StepOutput:
    """One StepOutput (loss detached) for a batch processed in chunks (``optim.grad_acc_steps``):
    means of the chunks' losses and statistics."""
    k = len(outs)
    if k == 1:
        return StepOutput(outs[0].loss.detach(), outs[0].logits, outs[0].stats,
                          outs[0].verified, outs[0].relus, outs[0].diagnostics)
    stats = {key: sum(o.stats[key] for o in outs) / k for key in outs[0].stats}
    diagnostics = {key: sum(o.diagnostics[key] for o in outs) / k for key in outs[0].diagnostics}
    verified = None if outs[0].verified is None else torch.cat([o.verified for o in outs])
    relus = next((o.relus for o in outs if o.relus), None)
    return StepOutput(sum(o.loss.detach() for o in outs) / k,
                      torch.cat([o.logits for o in outs]), stats, verified, relus, diagnostics)


def fit(s: TrainSetup, resume_state: dict | None = None) -> list[dict]:
    """Train for ``s.epochs`` epochs, appending to metrics.jsonl and writing last.pt atomically
    after each. With ``resume_state`` (a loaded checkpoint), continue after the epoch it
    recorded.

    Each batch is one optimiser step; ``optim.grad_acc_steps = k`` splits it into k chunks
    whose gradients accumulate (the meaning in the released code of Shi et al. 2021: the
    batch size, hence the schedule, is kept while memory falls about k-fold).

    Plot-only values (regularisers, ReLU states) are computed on diagnostic steps only: the
    epoch's record averages them over :data:`RECORD_STEPS` evenly spaced steps (the last one
    included), the same whatever the logger; W&B's per-step logs (every ``logger.log_every``
    steps) compute them for their own steps.
    """
    params = [p for p in s.net.model.parameters() if p.requires_grad]
    optimizer, lr_sched = s.optim.build(params)
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
    log_every = int(s.logger.log_every or 0)
    record_every = max(1, steps // RECORD_STEPS)
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
        eps = 0.0
        for i, (x, y) in enumerate(bar):
            step = epoch * steps + i
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            eps = s.schedule.eps(step)
            log_now = log_every > 0 and step % log_every == 0
            record_now = i % record_every == 0 or i + 1 == steps
            diagnose = log_now or record_now
            optimizer.zero_grad(set_to_none=True)
            chunks = list(zip(x.chunk(s.optim.grad_acc_steps), y.chunk(s.optim.grad_acc_steps)))
            outs = []
            for xc, yc in chunks:
                lower, upper = s.box_fn(xc, eps)
                out = s.method.step(s.net, Batch(xc, yc, lower, upper, eps,
                                                 s.schedule.eps_target, s.box_fn, diagnose))
                (out.loss / len(chunks)).backward()
                outs.append(out)
            out = _merge(outs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.optim.grad_clip)
            optimizer.step()
            stats.add(out, y, out.loss, record_now)
            if diagnose:
                _check_finite(out.loss, epoch, i, eps)
                if log_now:
                    s.logger.log_step({"train/loss": out.loss.item(), "train/eps": eps,
                                       "train/lr": optimizer.param_groups[0]["lr"],
                                       "train/grad_norm": grad_norm.item(),
                                       **{f"train/{k}": _number(v) for k, v in
                                          {**out.stats, **out.diagnostics}.items()}}, step)
                bar.set_postfix(eps=f"{eps:.4f}", loss=f"{out.loss.item():.3f}", refresh=False)
        bar.close()
        lr_sched.step()
        record = {"epoch": epoch + 1, "phase": s.schedule.phase(epoch), "eps": eps,
                  "lr": optimizer.param_groups[0]["lr"], **stats.record(),
                  "epoch_time_s": time.perf_counter() - t0}
        if s.epoch_metrics is not None:
            record.update(s.epoch_metrics(s.net))
        _check_finite(torch.tensor(record["loss"]), epoch, steps - 1, eps)
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


def _check_finite(loss: torch.Tensor, epoch: int, batch: int, eps: float) -> None:
    """Read on diagnostic steps and once per epoch (a per-step check would wait on the device
    every step); an epoch's record is never written with a non-finite loss."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} (by batch "
                                 f"{batch}, eps={eps:.4g}); lower optim.lr or check the model")


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

