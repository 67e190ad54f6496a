"""Which device a run trains on, and a small GPU pool for parallel sweeps on one node.

Hydra's joblib launcher runs jobs in loky worker processes that are *reused*, so "GPU = job
number modulo GPU count" puts two jobs on one GPU, and setting ``CUDA_VISIBLE_DEVICES`` inside a
job is ignored once the worker has touched CUDA. Instead each job takes the first free GPU of a
pool by an exclusive, non-blocking ``fcntl.flock`` on one lock file per device, holds it for the
job's lifetime (the OS drops the lock if the process dies) and uses ``cuda:<i>`` explicitly.
With ``hydra.launcher.n_jobs`` equal to the pool size no job ever waits.

Two layers:

* :class:`fastcert.device_pool.DevicePool` (no torch): indices + lock keys + a lock dir;
  ``acquire()`` returns an index, ``release()`` frees it. Tests drive it with fake devices.
* this module: :func:`acquire_device` / :func:`release_device`, the torch/CUDA glue the
  pipeline calls with the ``device`` and ``devices`` config values.

Device spec (the ``device`` config value):

* ``auto``: CPU when CUDA is unavailable. On SLURM with GPUs given to a single-GPU task, or a
  job started by submitit: ``cuda:0``, as SLURM gave it. Otherwise the pool when there is more
  than one visible GPU, a ``devices`` list, or an active Hydra multirun; else ``cuda:0``.
* ``pool``: always the pool (CPU when CUDA is unavailable).
* ``cpu``, ``cuda``, ``cuda:1``: used as given, without a lock.

A data-parallel run of N ranks (``nproc=N``) leases N devices at once
(:func:`acquire_devices`): all or none, so two such jobs never deadlock holding half each;
with ``hydra.launcher.n_jobs`` = pool size / N no job waits.

``devices`` (a list of indices or null) restricts the pool. Indices count within the devices
the process can see, so with ``CUDA_VISIBLE_DEVICES=2,3`` the pool is ``[0, 1]`` and
``devices=[1]`` means physical GPU 3. Lock files are named by the physical id (the
``CUDA_VISIBLE_DEVICES`` entry), so jobs started with different visible sets still exclude each
other. Environment: ``FASTCERT_LOCK_DIR`` (default ``/tmp/fastcert-devices-<uid>``, plus
``-slurm<job id>`` inside a SLURM job), ``FASTCERT_DEVICE_TIMEOUT`` (seconds a job waits for a
free device, default 24 h).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from fastcert.device_pool import TIMEOUT_ENV, DevicePool

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 24 * 3600.0
POOL_SPECS = ("auto", "pool")


def _config_error(msg: str) -> Exception:
    from fastcert.config import ConfigError  # lazy: keeps this module free of torch imports

    return ConfigError(msg)


def check_device_spec(spec: Any) -> None:
    """Refuse a ``device`` value that is none of auto, pool, cpu, cuda, cuda:<index> (checked
    with the config, before anything is built; whether CUDA is there is checked when the
    device is taken)."""
    text = "auto" if spec is None else str(spec).strip()
    kind, _, index = text.partition(":")
    if text in (*POOL_SPECS, "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return
    raise _config_error(f"device={text}: fastcert runs on the CPU or on CUDA GPUs; use "
                        f"device=auto, pool, cpu, cuda or cuda:<index>")


# --------------------------------------------------------------------------- the pool's devices


def visible_device_keys(count: int, visible: str | None) -> list[str]:
    """Lock keys of the ``count`` devices CUDA shows: the ``CUDA_VISIBLE_DEVICES`` entries
    (physical ids or UUIDs) when it is set, else ``"0" .. "count-1"``."""
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if len(entries) >= count:
            return entries[:count]
    return [str(i) for i in range(count)]


def parse_devices(devices: Any) -> list[int] | None:
    """``devices`` config value → list of ints or None (accepts a list, an int, or "0,1")."""
    if devices is None:
        return None
    if isinstance(devices, str):
        text = devices.strip().strip("[]")
        if text.lower() in ("", "null", "none"):
            return None
        devices = [p for p in text.split(",") if p.strip()]
    elif isinstance(devices, int):
        devices = [devices]
    try:
        out = [int(d) for d in devices]
    except (TypeError, ValueError):
        raise _config_error(f"devices={devices!r}: give a list of device indices, "
                            f"e.g. devices=[0,1]") from None
    if not out:
        raise _config_error("devices=[]: give at least one device index, or devices=null")
    if len(set(out)) != len(out):
        raise _config_error(f"devices={out}: an index appears twice")
    return out


def pool_slots(count: int, devices: Sequence[int] | None = None,
               visible: str | None = None) -> list[tuple[int, str]]:
    """``(index, lock key)`` for each device of the pool: all ``count`` visible devices, or the
    ``devices`` subset (indices within the visible set)."""
    keys = visible_device_keys(count, visible)
    if devices is None:
        return list(enumerate(keys))
    bad = [i for i in devices if not 0 <= i < count]
    if bad:
        where = (f" (CUDA_VISIBLE_DEVICES={visible}: indices count within that set)"
                 if visible is not None else "")
        raise _config_error(f"devices={list(devices)}: {bad} not among the {count} visible CUDA "
                            f"device(s) 0..{count - 1}{where}")
    return [(i, keys[i]) for i in devices]


# --------------------------------------------------------------------------- torch / CUDA glue

_local = threading.local()  # the lease of the job running in this thread


def multirun_active() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def slurm_gpus_given() -> bool:
    """Inside a SLURM job that was allocated GPUs."""
    if not os.environ.get("SLURM_JOB_ID"):
        return False
    return any(os.environ.get(k) for k in (
        "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS",
        "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")) or bool(os.environ.get(
            "CUDA_VISIBLE_DEVICES"))


def _timeout_default() -> float | None:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    if text.lower() in ("none", "inf", "forever"):
        return None
    return float(text)


def _job_label() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            job = HydraConfig.get().job
            return f"job={job.get('num', '')} {job.get('override_dirname', '')}".strip()
    except Exception:
        pass
    return ""


def acquire_device(spec: str | None = "auto", devices: Any = None, *,
                   timeout: float | None | str = "env", poll: float = 1.0,
                   lock_dir: str | os.PathLike | None = None):
    """The ``torch.device`` this job trains on (see the module docstring for ``spec``).

    A pool device stays locked until :func:`release_device` (call it when the job ends) or
    until the process exits; calling again while holding one returns the same device.
    """
    import torch

    spec = "auto" if spec is None else str(spec).strip()
    devices = parse_devices(devices)
    if spec not in POOL_SPECS:
        return _explicit_device(spec, devices)
    lease = getattr(_local, "lease", None)
    if lease is not None:
        return lease[0]
    if not torch.cuda.is_available():
        if devices is not None or spec == "pool":
            log.warning("no CUDA device available: running on the CPU (devices=%s ignored)",
                        devices)
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if spec == "auto" and devices is None and _own_gpu(count):
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return _lease_one(count, devices, timeout, poll, lock_dir)


def _explicit_device(spec: str, devices: list[int] | None):
    """``cpu``, ``cuda`` or ``cuda:<i>`` as given (checked; no lock)."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise _config_error(f"device={spec}: use auto, pool, cpu, cuda or cuda:<index>") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _config_error(f"device={spec} but CUDA is not available; use device=auto "
                                f"or cpu")
        if device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                raise _config_error(f"device={spec}: only {count} CUDA device(s) visible")
            torch.cuda.set_device(device.index)
    if devices is not None:
        log.warning("devices=%s is ignored because device=%s is explicit", devices, spec)
    return device


def _own_gpu(count: int) -> bool:
    """Whether ``device=auto`` takes ``cuda:0`` without the pool: SLURM gave this task its own
    GPU(s) (one, or a job started by submitit: use them as given), or the only GPU outside a
    multirun."""
    if slurm_gpus_given() and (count == 1 or os.environ.get("SUBMITIT_EXECUTOR") == "slurm"):
        return True
    return count == 1 and not multirun_active()


def _lease_one(count: int, devices: list[int] | None, timeout, poll: float, lock_dir):
    """The first free GPU of the pool, locked and held by this job (this thread)."""
    import torch

    slots = pool_slots(count, devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    pool = DevicePool([i for i, _ in slots], lock_dir=lock_dir, keys=[k for _, k in slots])
    index = pool.acquire(timeout=_timeout_default() if timeout == "env" else timeout,
                         poll=poll, prefer=getattr(_local, "last_index", None),
                         label=_job_label())
    try:
        torch.cuda.set_device(index)
    except BaseException:
        pool.release()
        raise
    device = torch.device("cuda", index)
    _local.lease = (device, pool)
    _local.last_index = index  # a reused worker prefers the GPU it already has a context on
    log.info("using %s (pool %s, lock %s)", device, pool.indices, pool.lock_path(
        pool.keys[pool.indices.index(index)]))
    return device


def acquire_devices(spec: str | None = "auto", devices: Any = None, count: int = 1, *,
                    timeout: float | None | str = "env", poll: float = 1.0,
                    lock_dir: str | os.PathLike | None = None) -> list:
    """``count`` devices for the ranks of one data-parallel run (``nproc=count``), rank r on
    the r-th. ``spec`` as for :func:`acquire_device`: ``cpu``, or no CUDA: the CPU ``count``
    times (gloo); ``cuda`` / ``cuda:i``: devices i .. i+count-1 as given; ``auto`` / ``pool``:
    a lease of ``count`` devices of the pool taken together (all or none), held until
    :func:`release_device`."""
    import torch

    if count == 1:
        return [acquire_device(spec, devices, timeout=timeout, poll=poll, lock_dir=lock_dir)]
    spec = "auto" if spec is None else str(spec).strip()
    if spec not in POOL_SPECS:
        first = acquire_device(spec, None)
        if first.type != "cuda":
            return [first] * count
        start, visible = first.index or 0, torch.cuda.device_count()
        if start + count > visible:
            raise _config_error(f"nproc={count} from device={spec}: only {visible} CUDA "
                                f"device(s) visible")
        return [torch.device("cuda", start + r) for r in range(count)]
    lease = getattr(_local, "lease", None)
    if lease is not None:
        return [torch.device("cuda", i) for i in lease[1].leased]
    if not torch.cuda.is_available():
        return [torch.device("cpu")] * count
    slots = pool_slots(torch.cuda.device_count(), parse_devices(devices),
                       os.environ.get("CUDA_VISIBLE_DEVICES"))
    if count > len(slots):
        raise _config_error(f"nproc={count} but the device pool has {len(slots)} GPU(s) "
                            f"{[i for i, _ in slots]}: use nproc <= {len(slots)}")
    pool = DevicePool([i for i, _ in slots], lock_dir=lock_dir, keys=[k for _, k in slots])
    pool.acquire(timeout=_timeout_default() if timeout == "env" else timeout, poll=poll,
                 label=_job_label(), count=count)
    out = [torch.device("cuda", i) for i in pool.leased]
    _local.lease = (out[0], pool)
    log.info("using %s (pool %s)", out, pool.indices)
    return out


def release_device() -> None:
    """Free the pool device held by this job, if any (the pipeline calls it when a run ends),
    returning this process's cached CUDA memory first so the next holder gets the whole GPU."""
    lease = getattr(_local, "lease", None)
    _local.lease = None
    if lease is None:
        return
    _, pool = lease
    try:
        import gc

        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        pool.release()


def held_device():
    """The pool device this job holds, or None."""
    lease = getattr(_local, "lease", None)
    return None if lease is None else lease[0]


__all__ = ["acquire_device", "acquire_devices", "release_device", "held_device", "pool_slots",
           "visible_device_keys", "parse_devices", "multirun_active"]
