"""The training loop: batches → method.step → optimiser, per-epoch records and checkpoints.

It knows no method by name: whatever :class:`fastcert.methods.Method` is given turns a batch
into a loss. Each epoch reseeds the RNGs from (seed, epoch), so an epoch's data order and
augmentation are the same whether the run was resumed or not. In a data-parallel run
(:mod:`fastcert.distributed`) each rank trains on its share of every batch through DDP, the
epoch's numbers are summed over ranks, and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastcert import checkpoint, distributed
from fastcert.aids import Aids
from fastcert.bounds import BoundedNet
from fastcert.loggers import Logger
from fastcert.methods import Batch, Method, StepOutput
from fastcert.optim import Optimizer
from fastcert.regularizers import relu_states
from fastcert.schedules import EpsSchedule
from fastcert.seeding import seed_everything, stream_seed
from fastcert.selection import Selector
from fastcert.whole_batch_bn import whole_batch_statistics

#: Evenly spaced steps per epoch whose plot-only values (ReLU states, regularisers) the epoch's
#: record averages (fewer when an epoch has fewer steps).
RECORD_STEPS = 8


#: Offset of rank r's global-RNG seed in a data-parallel run (r · this), far from epoch seeds.
RANK_SEED_STRIDE = 7_919_000_003


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
    dist: distributed.Dist | None = None  # a data-parallel run: this rank
    channels_last: bool = False           # batches in channels-last memory format (CUDA)
    # measurements of the network after each epoch, added to its record (e.g. propagation
    # tightness on a fixed test batch); must leave the network, its gradients and the RNGs as
    # they were, so that a resumed run stays identical
    epoch_metrics: Callable[[BoundedNet], dict] | None = None
    aids: Aids | None = None            # the training aids (fastcert.aids); None: all off
    selector: Selector | None = None    # model selection after each epoch (fastcert.selection)
    # called with each epoch's record once it is saved (last.pt written): True ends the
    # training there (fastcert.search's early stopping of dominated trials)
    stop: Callable[[dict], bool] | None = None


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
        self.relu: dict[str, list[float]] = {}  # per layer: Σ over recorded steps of share·value
        self.relu_steps = 0.0                   # Σ of those shares (the recorded steps)

    def add(self, out: StepOutput, y: torch.Tensor, loss: torch.Tensor, diagnostics: bool,
            share: float = 1.0):
        """One step; its plot-only values (regularisers, ReLU states) when ``diagnostics``.
        ``share``: this process's fraction of the step's batch (1 in a one-process run), so
        that ReLU states summed over ranks are those of the whole batch."""
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
                row = self.relu.setdefault(k, [0.0] * len(per_layer))
                self.relu[k] = [a + share * v for a, v in zip(row, per_layer)]
            self.relu_steps += share

    def record(self, dist: distributed.Dist | None = None) -> dict:
        """The epoch's means; in a data-parallel run, of every rank's steps together."""
        if dist is not None:
            self._sum_over_ranks(dist.device)
        rec = {k: _number(self.sums[k]) / self.counts[k] for k in self.sums}
        rec["train_clean_acc"] = _number(self.correct) / max(self.n, 1)
        if self.verified_n:
            rec["train_verified_acc"] = _number(self.verified) / self.verified_n
        for k, sums in self.relu.items():
            rec[f"relu_{k}"] = [v / self.relu_steps for v in sums]
        return rec

    def _sum_over_ranks(self, device: torch.device) -> None:
        """Replace every sum and count by its sum over ranks (one all-reduce)."""
        keys, relu_keys = sorted(self.sums), sorted(self.relu)
        values = ([self.sums[k] for k in keys] + [self.counts[k] for k in keys]
                  + [self.correct, self.verified, self.n, self.verified_n, self.relu_steps]
                  + [v for k in relu_keys for v in self.relu[k]])
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                            for v in values])
        it = iter(distributed.all_reduce_(flat).tolist())
        for k in keys:
            self.sums[k] = next(it)
        for k in keys:
            self.counts[k] = next(it)
        self.correct, self.verified, self.n, self.verified_n, self.relu_steps = (
            next(it) for _ in range(5))
        self.relu = {k: [next(it) for _ in self.relu[k]] for k in relu_keys}


def _number(v) -> float:
    return v.item() if isinstance(v, torch.Tensor) else float(v)


def _merge(outs: list[StepOutput], sizes: list[int]) -> StepOutput:
    """One StepOutput (loss detached) for a batch processed in chunks of ``sizes`` examples
    (``optim.grad_acc_steps``): the chunks' losses and statistics averaged by size, i.e. the
    batch's means."""
    if len(outs) == 1:
        return StepOutput(outs[0].loss.detach(), outs[0].logits, outs[0].stats,
                          outs[0].verified, outs[0].relus, outs[0].diagnostics)
    w = [n / sum(sizes) for n in sizes]
    stats = {key: sum(wi * o.stats[key] for wi, o in zip(w, outs)) for key in outs[0].stats}
    diagnostics = {key: sum(wi * o.diagnostics[key] for wi, o in zip(w, outs))
                   for key in outs[0].diagnostics}
    verified = None if outs[0].verified is None else torch.cat([o.verified for o in outs])
    relus = next((o.relus for o in outs if o.relus), None)
    return StepOutput(sum(wi * o.loss.detach() for wi, o in zip(w, outs)),
                      torch.cat([o.logits for o in outs]), stats, verified, relus, diagnostics)


def fit(s: TrainSetup, resume_state: dict | None = None) -> list[dict]:
    """Train for ``s.epochs`` epochs, appending to metrics.jsonl and writing last.pt atomically
    after each. With ``resume_state`` (a loaded checkpoint), continue after the epoch it
    recorded.

    Each batch is one optimiser step; ``optim.grad_acc_steps = k`` splits it into k chunks
    whose gradients accumulate (the meaning in the released code of Shi et al. 2021: the
    batch size, hence the schedule, is kept while memory falls about k-fold); each chunk's
    mean loss is weighted by its share of the batch, so without BatchNorm the gradient is the
    whole batch's whatever the chunk sizes.

    ``s.stop`` may end the training after an epoch (the history then ends there).

    Plot-only values (regularisers, ReLU states) are computed on diagnostic steps only: the
    epoch's record averages them over :data:`RECORD_STEPS` evenly spaced steps (the last one
    included), the same whatever the logger; W&B's per-step logs (every ``logger.log_every``
    steps) compute them for their own steps.
    """
    loop = _Loop(s)
    start_epoch = 0 if resume_state is None else loop.restore(resume_state)
    # metrics.jsonl describes the run that wrote last.pt: drop epochs after the checkpoint
    # (written before a kill), or, on a fresh start, the record of a run killed before its
    # first checkpoint (the pipeline refuses a fresh start where a last.pt exists).
    history = _truncate_metrics(s.run_dir / "metrics.jsonl", start_epoch, write=loop.main)
    for epoch in range(start_epoch, s.epochs):
        record = loop.epoch(epoch)
        history.append(record)
        if loop.main:
            loop.save(record)
        if s.stop is not None and s.stop(record):
            break
    return history


class _Loop:
    """The training loop's state (optimiser, LR schedule, DDP wrapper, the aids' state) and
    its steps: restore a checkpoint, one epoch, one optimiser step, save the epoch."""

    def __init__(self, s: TrainSetup):
        self.s = s
        self.params = [p for p in s.net.model.parameters() if p.requires_grad]
        self.optimizer, self.lr_sched = s.optim.build(self.params)
        self.main = s.dist is None or s.dist.main  # the process that writes and prints
        self.ddp = (None if s.dist is None else
                    distributed.data_parallel(s.net, s.method, s.dist))
        self.global_sizes = getattr(s.train_loader, "global_sizes", None)
        self.memory_format = torch.channels_last if s.channels_last else torch.preserve_format
        self.steps = len(s.train_loader)
        self.log_every = int(s.logger.log_every or 0)
        self.record_every = max(1, self.steps // RECORD_STEPS)
        self.aids = (s.aids or Aids()).start(s.net.model, self.steps, s.epochs)

    def restore(self, state: dict) -> int:
        """Weights, optimiser, LR schedule and RNGs of a checkpoint; the epochs it trained."""
        self.s.net.model.load_state_dict(state["model"])  # copies in place: views stay tied
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        checkpoint.set_rng_state(state["rng"])
        self.aids.load_state_dict(state.get("aids"))
        if self.s.selector is not None:
            self.s.selector.load_state_dict(state.get("select"))
        return state["epoch"]

    def method_step(self, batch: Batch, sync: bool) -> StepOutput:
        """The method's step, through DDP in a data-parallel run (``sync``: reduce this
        backward's gradients; the earlier chunks of an accumulated batch do not)."""
        if self.ddp is None:
            return self.s.method.step(self.s.net, batch)
        if sync:
            return self.ddp(batch)
        with self.ddp.no_sync():
            return self.ddp(batch)

    def epoch(self, epoch: int) -> dict:
        """One pass over the training batches; the epoch's record."""
        s = self.s
        # the global RNG feeds the methods' random draws (attack starts); each rank draws its
        # own (rank 0 the one-process stream): the batches come from the loader's generator
        seed_everything(stream_seed(s.seed, epoch) + (s.dist.rank * RANK_SEED_STRIDE
                                                      if s.dist is not None else 0))
        generator = getattr(s.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(stream_seed(s.seed, epoch))
        s.net.train()
        stats = _EpochStats()
        t0 = time.perf_counter()
        bar = tqdm(s.train_loader, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=1.0, disable=not self.main)
        eps = 0.0
        for i, (x, y) in enumerate(bar):
            eps = self.step(epoch, i, x, y, stats, bar)
        bar.close()
        aids = self.aids.end_epoch(epoch, self.train_inputs)
        self.lr_sched.step()
        record = {"epoch": epoch + 1, "phase": s.schedule.phase(epoch), "eps": eps,
                  "lr": self.optimizer.param_groups[0]["lr"], **stats.record(s.dist), **aids,
                  "epoch_time_s": time.perf_counter() - t0}
        if s.epoch_metrics is not None:
            record.update(s.epoch_metrics(s.net))
        if s.selector is not None:
            record.update(s.selector.after_epoch(s.net.model, epoch))
        _check_finite(torch.tensor(record["loss"]), epoch, self.steps - 1, eps)
        return record

    def train_inputs(self):
        """The training inputs batch by batch on the device (a fresh pass over the loader):
        what the aids' BatchNorm passes read."""
        for x, _ in self.s.train_loader:
            yield x.to(self.s.device, non_blocking=True, memory_format=self.memory_format)

    def step(self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor, stats: _EpochStats,
             bar) -> float:
        """One optimiser step on batch ``i`` (in ``optim.grad_acc_steps`` chunks); its ε."""
        s = self.s
        step = epoch * self.steps + i
        x = x.to(s.device, non_blocking=True, memory_format=self.memory_format)
        y = y.to(s.device, non_blocking=True)
        weight = 1.0 if s.dist is None else s.dist.loss_weight(len(y), self.global_sizes[i])
        eps = s.schedule.eps(step)
        log_now = self.log_every > 0 and step % self.log_every == 0
        record_now = i % self.record_every == 0 or i + 1 == self.steps
        diagnose = log_now or record_now
        self.optimizer.zero_grad(set_to_none=True)
        aids = self.aids.pre_step(s.net, self.optimizer, x, y, s.box_fn, eps)
        with self.aids.shrinking():
            out = self._accumulate(x, y, eps, weight, diagnose)
        aids.update(self.aids.penalty())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.optim.grad_clip)
        self.optimizer.step()
        self.aids.after_step(step)
        out.stats.update(aids)
        stats.add(out, y, out.loss, record_now, weight / (s.dist.world if s.dist else 1))
        if diagnose:
            _check_finite(out.loss if s.dist is None else  # every rank stops together
                          distributed.all_reduce_(out.loss.detach().clone()), epoch, i, eps)
            if log_now:
                s.logger.log_step({"train/loss": out.loss.item(), "train/eps": eps,
                                   "train/lr": self.optimizer.param_groups[0]["lr"],
                                   "train/grad_norm": grad_norm.item(),
                                   **{f"train/{k}": _number(v) for k, v in
                                      {**out.stats, **out.diagnostics}.items()}}, step)
            bar.set_postfix(eps=f"{eps:.4f}", loss=f"{out.loss.item():.3f}", refresh=False)
        return eps

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, eps: float, weight: float,
                    diagnose: bool) -> StepOutput:
        """The gradients of the batch's mean loss, chunk by chunk (each chunk's mean loss
        weighted by its share of the batch; BatchNorm as ``optim.grad_acc_bn`` says); the
        chunks' outputs merged."""
        s = self.s
        k = s.optim.grad_acc_steps
        chunks = list(zip(x.chunk(k), y.chunk(k)))
        whole = len(chunks) > 1 and s.optim.grad_acc_bn == "batch"
        outs = []
        with whole_batch_statistics(s.net, x) if whole else contextlib.nullcontext():
            for j, (xc, yc) in enumerate(chunks):
                lower, upper = s.box_fn(xc, eps)
                last = j + 1 == len(chunks)
                out = self.method_step(Batch(xc, yc, lower, upper, eps, s.schedule.eps_target,
                                             s.box_fn, diagnose), sync=last)
                # chunk means → batch mean; the whole batch's statistics serve every chunk
                (out.loss * (weight * len(yc) / len(y))).backward(retain_graph=whole and not last)
                outs.append(out)
        return _merge(outs, [len(yc) for _, yc in chunks])

    def save(self, record: dict) -> None:
        """The epoch's record appended to metrics.jsonl, last.pt, the logger, the console."""
        s = self.s
        with open(s.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        state = {"model": s.net.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_sched.state_dict(), "epoch": record["epoch"],
                 "rng": checkpoint.rng_state(), "aids": self.aids.state_dict(),
                 "select": None if s.selector is None else s.selector.state_dict(),
                 **(s.checkpoint_extra() if s.checkpoint_extra else {})}
        checkpoint.save_atomic(state, s.run_dir / "last.pt")
        s.logger.log_epoch(record, record["epoch"])
        tqdm.write(_epoch_line(record))


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the run stops; the checkpoint of the last
    finished epoch stays."""


def _check_finite(loss: torch.Tensor, epoch: int, batch: int, eps: float) -> None:
    """Read on diagnostic steps and once per epoch (a per-step check would wait on the device
    every step); an epoch's record is never written with a non-finite loss."""
    if not torch.isfinite(loss):
        kept = (f"last.pt keeps epoch {epoch}" if epoch else "no checkpoint was written")
        raise TrainingDiverged(
            f"the training loss is {loss.item()} at epoch {epoch + 1} (by batch {batch}, "
            f"eps={eps:.4g}): training diverged; {kept}. Start again with a lower optim.lr "
            f"(or a longer warmup, schedule.length)")


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


def _truncate_metrics(path: Path, last_epoch: int, write: bool = True) -> list[dict]:
    """Keep only the records of epochs up to ``last_epoch`` (the checkpoint's) and a torn last
    line's removal, rewriting the file atomically (when ``write``); returns the kept records."""
    keep = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    if write and path.exists():
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

