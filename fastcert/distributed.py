"""One run across several processes (data parallel): ``torchrun --nproc_per_node=N -m
fastcert.run ...``, or ``nproc=N`` (the pipeline spawns the N ranks itself, on N devices of the
pool, :func:`fastcert.parallel.run_parallel`: how a sweep runs N-device jobs).

What each rank does (the rest of fastcert sees only a :class:`Dist`):

* Data: every rank walks the global batches of a one-process run and keeps its share
  (:class:`fastcert.data.Shard`); the test set is split in blocks of whole batches and the
  results are gathered in order (:func:`gather`).
* Gradients: ``DistributedDataParallel`` over a module whose forward is the method's step
  (:class:`StepModule`). DDP over the plain model does *not* work here: the loss is computed
  through auto_LiRPA's BoundedModule, not through DDP's forward, so DDP's reducer never expects
  the gradients and silently leaves each rank with its own (measured: ranks' gradients differed
  by 0.5). DDP averages over ranks, so each rank's loss (a mean over its share) is weighted by
  ``world · n_rank / n_batch`` (:meth:`Dist.loss_weight`): the sum is the gradient of the
  global batch's mean loss, also for a last batch that does not split evenly.
* BatchNorm: the batch statistics are those of the global batch, by an all-reduce of the
  per-channel sums (two passes: the mean, then the squared deviations from it; autograd flows
  through both, :func:`global_moments`), in both views of the network: the ``nn.BatchNorm``
  modules (:func:`sync_batchnorm`) and auto_LiRPA's ``BoundBatchNormalization`` nodes, whose
  statistics the IBP/CROWN bounds use. ``torch.nn.SyncBatchNorm`` is not used: auto_LiRPA traces
  the model in eval mode, where SyncBatchNorm is a plain ``batch_norm``, so the bounded view
  would normalise each rank's share with its own statistics (tests/test_distributed.py shows the
  traced node), and SyncBatchNorm refuses CPU tensors (no ``gloo`` test).
* Random draws of the methods (the attack starts of PGD-AT, SABR, TAPS, MTL/CC/Exp-IBP) come
  from each rank's global RNG, seeded per epoch and rank (rank 0: the one-process stream), so
  the ranks' draws are independent; a data-parallel run of such a method equals a one-process
  run in distribution, and bit for bit (up to float summation order) for the deterministic
  methods (natural, IBP, fast, CROWN-IBP).
* Gradient accumulation (``optim.grad_acc_steps > 1``) is refused: the ranks split the batch.
* Only rank 0 writes (checkpoints, metrics.jsonl, results.json, W&B) and prints; every rank
  runs the same steps (ranks > 0 keep rank 0's logging cadence, so the diagnostic steps match).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from fastcert.data import Shard

#: torchrun's environment
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes and prints."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def loss_weight(self, n_rank: int, n_batch: int) -> float:
        """Weight of this rank's mean loss so that DDP's average over ranks is the gradient
        of the global batch's mean: world · n_rank / n_batch."""
        return self.world * n_rank / n_batch


_current: Dist | None = None


def current() -> Dist | None:
    """The data-parallel context of this process (None: a one-process run)."""
    return _current


def init(rank: int, world: int, device: torch.device | str, init_method: str = "env://") -> Dist:
    """Join the process group (NCCL on CUDA, gloo on CPU) and make BatchNorm's statistics
    global in auto_LiRPA's bounds."""
    global _current
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    _patch_bound_batchnorm()
    _current = Dist(rank, world, device)
    return _current


def init_from_env() -> Dist | None:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment): join its process group, on
    ``cuda:LOCAL_RANK`` (the CPU without CUDA). The run dir is rank 0's: it claims it and
    broadcasts it (:func:`fastcert.preflight.output_dir`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start with torchrun")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device)


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


# --------------------------------------------------------------------------- collectives


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no autograd)."""
    dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    dist.barrier()


# --------------------------------------------------------------------------- gradients


class StepModule(nn.Module):
    """What DDP wraps: forward = ``method.step(net, batch)``, so the step's whole graph (the
    BoundedModule's included) is built inside DDP's forward and its gradients are reduced."""

    def __init__(self, net: nn.Module, method):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, batch):
        return self.method.step(self.net, batch)


def data_parallel(net: nn.Module, method, ctx: Dist) -> nn.parallel.DistributedDataParallel:
    """DDP over :class:`StepModule` (batches are already on this rank's device: no
    ``device_ids``, nothing is moved); BatchNorm buffers are not broadcast each step (every
    rank updates them with the same global statistics)."""
    return nn.parallel.DistributedDataParallel(StepModule(net, method), forward_sync_buffers=False)


# --------------------------------------------------------------------------- BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """Σ over ranks of a tensor, differentiable: the gradient of the sum with respect to each
    rank's term is the sum over ranks of the gradients flowing into it."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce_autograd(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) over the batches of all ranks
    together, and the global count per channel (a tensor: no host read). Two passes (mean,
    then Σ(x - mean)²), each one all-reduce of C sums; differentiable."""
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    sums = torch.cat([x.sum(dims), x.new_full((1,), float(count))])
    sums = _all_reduce_autograd(sums)
    n = sums[-1]
    mean = sums[:-1] / n
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sq = _all_reduce_autograd(((x - mean.view(shape)) ** 2).sum(dims))
    return mean, sq / n, n.detach()


def _update_running(running_mean, running_var, mean, var, total: torch.Tensor,
                    momentum: float) -> None:
    """Running statistics as ``nn.BatchNorm`` updates them (unbiased variance, n/(n-1) with n
    the global count)."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        unbiased = var.detach() * (total / (total - 1).clamp_min(1))
        running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def _normalise(x, mean, var, weight, bias, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    return out


def _active() -> bool:
    return _current is not None and _current.world > 1


def _synced_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and _active()):
        return type(self).forward(self, x)
    if self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
    momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                else self.momentum)
    mean, var, total = global_moments(x)
    _update_running(self.running_mean, self.running_var, mean, var, total, momentum)
    return _normalise(x, mean, var, self.weight, self.bias, self.eps)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm`` of ``model`` normalise with the global batch's statistics
    while training in a data-parallel run (eval mode, and one-process runs, are unchanged).
    In place: parameters and buffers stay the same tensors."""
    import types

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_synced_bn_forward, module)
    return model


def _patch_bound_batchnorm() -> None:
    """auto_LiRPA's BoundBatchNormalization, training mode in a data-parallel run: the same
    global statistics, stored where its IBP/CROWN bound code reads them (``current_mean``,
    ``current_var``)."""
    from fastcert.bounds import auto_lirpa

    BN = auto_lirpa().BoundBatchNormalization
    if getattr(BN, "_fastcert_synced", False):
        return
    original = BN.forward

    def forward(self, x, w, b, m, v):
        if not (self.training and _active()):
            return original(self, x, w, b, m, v)
        if x.dim() == 2:
            self.patches_start = False
        self.current_mean, self.current_var, total = global_moments(x)
        _update_running(m, v, self.current_mean, self.current_var, total, self.momentum)
        self._check_unused_mean_or_var()
        if not self.use_affine:
            w, b = torch.ones_like(w), torch.zeros_like(b)
        return _normalise(x, self.current_mean, self.current_var, w, b, self.eps)

    BN.forward = forward
    BN._fastcert_synced = True


# --------------------------------------------------------------------------- spawning ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, devices: list[torch.device]) -> None:
    """Run ``fn(ctx, *args)`` in ``len(devices)`` fresh processes, rank r on ``devices[r]``,
    joined in one process group; returns when all have finished (an error in one ends all and
    is raised here)."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_rank_main, args=(fn, args, [str(d) for d in devices], port),
                       nprocs=len(devices), start_method="spawn", join=True)


def _rank_main(rank: int, fn, args, devices: list[str], port: int) -> None:
    ctx = init(rank, len(devices), devices[rank], f"tcp://127.0.0.1:{port}")
    try:
        fn(ctx, *args)
    finally:
        shutdown()


__all__ = ["Dist", "current", "init", "init_from_env", "shutdown", "broadcast", "gather",
           "all_reduce_", "barrier", "StepModule", "data_parallel", "global_moments",
           "sync_batchnorm", "spawn"]
