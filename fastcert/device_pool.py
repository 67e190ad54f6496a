"""A pool of devices on one node, each used by one job at a time: an exclusive, non-blocking
``fcntl.flock`` on one lock file per device, held for the job's lifetime (the OS drops the
lock if the process dies). No torch: indices, lock keys and a lock dir; tests drive it with
fake devices. :mod:`fastcert.devices` maps the ``device`` / ``devices`` config values onto it.

Lock files are named by host and key (the physical id, the ``CUDA_VISIBLE_DEVICES`` entry),
so jobs started with different visible sets still exclude each other. Environment:
``FASTCERT_LOCK_DIR`` (default ``/tmp/fastcert-devices-<uid>``, plus ``-slurm<job id>`` inside
a SLURM job).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "FASTCERT_LOCK_DIR"
#: Seconds a job waits for a free device (read by :mod:`fastcert.devices`, named in messages).
TIMEOUT_ENV = "FASTCERT_DEVICE_TIMEOUT"


class DeviceBusyError(TimeoutError):
    """Every device of the pool stayed busy for the whole timeout."""



def default_lock_dir() -> Path:
    """``$FASTCERT_LOCK_DIR``, else ``<tmp>/fastcert-devices-<uid>`` (``-slurm<id>`` appended
    inside a SLURM job: SLURM renumbers each job's GPUs from 0, so ids are per job)."""
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    name = f"fastcert-devices-{os.getuid()}"
    if os.environ.get("SLURM_JOB_ID"):
        name += f"-slurm{os.environ['SLURM_JOB_ID']}"
    return Path(tempfile.gettempdir()) / name



def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


class DevicePool:
    """Exclusive use of ``count`` of ``indices`` per holder, by ``flock`` on ``lock_dir`` files.

    ``keys`` name the lock files (default: the indices); give the physical device ids so that
    processes with different ``CUDA_VISIBLE_DEVICES`` agree. One pool object holds at most one
    lease (one device, or ``count`` taken together); separate objects (threads, processes)
    exclude each other.
    """

    def __init__(self, indices: Iterable[int], lock_dir: str | os.PathLike | None = None,
                 keys: Iterable[str] | None = None):
        self.indices = [int(i) for i in indices]
        if not self.indices:
            raise ValueError("DevicePool needs at least one device index")
        self.keys = [str(k) for k in keys] if keys is not None else [str(i) for i in self.indices]
        if len(self.keys) != len(self.indices):
            raise ValueError("DevicePool: one lock key per index")
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self.host = socket.gethostname()
        self._held: list[tuple[int, int]] = []  # (index, lock fd) of the lease

    def lock_path(self, key: str) -> Path:
        return self.lock_dir / f"{_safe(self.host)}-cuda{_safe(key)}.lock"

    @property
    def held(self) -> bool:
        return bool(self._held)

    @property
    def index(self) -> int | None:
        """The (first) leased device, or None."""
        return self._held[0][0] if self._held else None

    @property
    def leased(self) -> list[int]:
        """Every leased device, in the order they were taken."""
        return [index for index, _ in self._held]

    def _lock(self, key: str, label: str) -> int | None:
        fd = os.open(self.lock_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        info = f"pid={os.getpid()} host={self.host} since={time.strftime('%F %T')} {label}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError:
            pass  # the note is only for messages; the lock is what counts
        return fd

    def try_acquire(self, prefer: int | None = None, label: str = "",
                    count: int = 1) -> int | None:
        """Lock the first free device (``prefer`` first when given); its index, or None.
        ``count`` > 1: lock that many free devices together or none (the lease's first index,
        or None; :attr:`leased` lists them)."""
        if self._held:
            return self.index
        if not 1 <= count <= len(self.indices):
            raise ValueError(f"a lease of {count} devices from a pool of {len(self.indices)}")
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        slots = list(zip(self.indices, self.keys))
        slots.sort(key=lambda s: s[0] != prefer)  # stable: prefer first, then pool order
        for index, key in slots:
            fd = self._lock(key, label)
            if fd is not None:
                self._held.append((index, fd))
                if len(self._held) == count:
                    return self.index
        self.release()  # fewer than count free: hold none (no job waits holding a part)
        return None

    def holders(self) -> dict[int, str]:
        """Who holds each busy device, as its lock file notes (for messages)."""
        out = {}
        for index, key in zip(self.indices, self.keys):
            if index in self.leased:
                continue
            try:
                note = self.lock_path(key).read_text().strip()
            except OSError:
                continue
            if note:
                out[index] = note
        return out

    def acquire(self, timeout: float | None = None, poll: float = 1.0,
                prefer: int | None = None, label: str = "", count: int = 1) -> int:
        """Wait (polling every ``poll`` s, up to ``timeout`` s; None: forever) for ``count``
        free devices and lock them; the (first) index. Raises :class:`DeviceBusyError` when
        they do not free up in time."""
        index = self.try_acquire(prefer, label, count)
        if index is not None:
            return index
        start = time.monotonic()
        wanted = "one" if count == 1 else f"{count} at once"
        log.warning("all %d device(s) %s are busy; waiting up to %s for %s to free up "
                    "(set hydra.launcher.n_jobs to at most the number of devices / nproc to "
                    "avoid waiting). Holders: %s", len(self.indices), self.indices,
                    "ever" if timeout is None else f"{timeout:.0f} s", wanted, self.holders())
        while True:
            if timeout is not None and time.monotonic() - start >= timeout:
                held = "; ".join(f"cuda:{i}: {n}" for i, n in self.holders().items())
                free = "free device" if count == 1 else f"{count} free devices"
                raise DeviceBusyError(
                    f"no {free} among {self.indices} after {timeout:.0f} s (lock dir "
                    f"{self.lock_dir}; held by {held or 'unknown'}). Run fewer parallel jobs "
                    f"(hydra.launcher.n_jobs), widen devices=[...], or raise "
                    f"{TIMEOUT_ENV}.")
            time.sleep(poll if timeout is None else
                       max(0.0, min(poll, timeout - (time.monotonic() - start))))
            index = self.try_acquire(prefer, label, count)
            if index is not None:
                log.info("acquired device(s) %s after %.1f s", self.leased,
                         time.monotonic() - start)
                return index

    def release(self) -> None:
        """Unlock the leased device(s) (no-op when none is held)."""
        held, self._held = self._held, []
        for _, fd in held:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a dropped pool frees its device, as a dead process would
        try:
            self.release()
        except Exception:
            pass
