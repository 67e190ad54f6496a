"""The file-lock device pool (fastcert.device_pool), tested with fake device indices: each
device goes to one holder at a time, across threads and processes, and a killed holder frees
it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from fastcert.device_pool import DeviceBusyError, DevicePool

# Helpers run in spawned processes: module level, and no torch import (fast start).


def _pool_worker(lock_dir, indices, rounds, hold_s, out_path, go):
    go.wait(60)
    pool = DevicePool(indices, lock_dir=lock_dir)
    records = []
    for _ in range(rounds):
        index = pool.acquire(timeout=60, poll=0.005)
        start = time.time()
        time.sleep(hold_s)
        end = time.time()
        pool.release()
        records.append([index, start, end, os.getpid()])
    Path(out_path).write_text(json.dumps(records))


def _hold_forever(lock_dir, indices, ready):
    pool = DevicePool(indices, lock_dir=lock_dir)
    pool.acquire(timeout=30, poll=0.01)
    ready.set()
    time.sleep(120)

# --------------------------------------------------------------------------- pool, in-process


def test_pool_hands_out_each_device_once(tmp_path):
    a, b, c = (DevicePool([0, 1], lock_dir=tmp_path) for _ in range(3))
    assert a.acquire(timeout=0) == 0
    assert b.acquire(timeout=0) == 1
    assert c.try_acquire() is None
    with pytest.raises(DeviceBusyError, match=r"no free device among \[0, 1\].*n_jobs"):
        c.acquire(timeout=0.2, poll=0.05)
    a.release()
    assert c.acquire(timeout=1, poll=0.05) == 0
    assert a.try_acquire() is None
    b.release(), c.release()
    b.release()  # releasing twice is harmless


def test_waiting_job_gets_the_device_when_freed(tmp_path):
    holder, waiter = DevicePool([3], lock_dir=tmp_path), DevicePool([3], lock_dir=tmp_path)
    holder.acquire(timeout=0)
    import threading

    threading.Timer(0.3, holder.release).start()
    t0 = time.monotonic()
    assert waiter.acquire(timeout=10, poll=0.02) == 3
    assert 0.2 < time.monotonic() - t0 < 5
    waiter.release()


def test_prefer_and_lock_files_named_by_key(tmp_path):
    pool = DevicePool([0, 1], lock_dir=tmp_path, keys=["GPU-aa/1", "7"])
    assert pool.acquire(timeout=0, prefer=1) == 1
    assert pool.lock_path("7").exists() and "cuda7" in pool.lock_path("7").name
    assert "/" not in pool.lock_path("GPU-aa/1").name
    assert f"pid={os.getpid()}" in pool.lock_path("7").read_text()
    other = DevicePool([5], lock_dir=tmp_path, keys=["7"])  # same physical GPU, other numbering
    assert other.try_acquire() is None
    pool.release()
    assert other.try_acquire() == 5
    other.release()


# --------------------------------------------------------------------------- pool, across processes


def test_processes_never_share_a_device(tmp_path):
    """4 processes × 3 jobs on 2 devices: the intervals during which a device is held never
    overlap, and both devices are used."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    outs = [tmp_path / f"w{i}.json" for i in range(4)]
    procs = [ctx.Process(target=_pool_worker,
                         args=(str(tmp_path / "locks"), [0, 1], 3, 0.1, str(out), go))
             for out in outs]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    records = [r for out in outs for r in json.loads(out.read_text())]
    assert len(records) == 12
    by_device: dict[int, list] = {}
    for index, start, end, pid in records:
        by_device.setdefault(index, []).append((start, end, pid))
    assert set(by_device) == {0, 1}
    for index, spans in by_device.items():
        spans.sort()
        for (_s0, e0, p0), (s1, _e1, p1) in zip(spans, spans[1:]):
            assert s1 >= e0, f"device {index} held by pids {p0} and {p1} at once"


def test_killed_holder_frees_its_device(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    lock_dir = str(tmp_path / "locks")
    proc = ctx.Process(target=_hold_forever, args=(lock_dir, [0], ready))
    proc.start()
    try:
        assert ready.wait(60), "holder never acquired the device"
        pool = DevicePool([0], lock_dir=lock_dir)
        with pytest.raises(DeviceBusyError, match=f"pid={proc.pid}"):
            pool.acquire(timeout=0.2, poll=0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert pool.acquire(timeout=5, poll=0.05) == 0
        pool.release()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
