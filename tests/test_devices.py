"""The per-node GPU pool (fastcert.devices), tested without a GPU: fake device indices for the
lock logic, a faked torch.cuda for the glue."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from fastcert import devices as D
from fastcert.devices import DeviceBusyError, DevicePool

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


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                "SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
                "SUBMITIT_EXECUTOR", D.TIMEOUT_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(D.LOCK_DIR_ENV, str(tmp_path / "locks"))
    yield
    D.release_device()
    D._local.__dict__.clear()  # forget this thread's preferred device between tests


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
        for (s0, e0, p0), (s1, e1, p1) in zip(spans, spans[1:]):
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


# --------------------------------------------------------------------------- restricting the pool


def test_visible_devices_and_devices_list_restrict_the_pool():
    assert D.pool_slots(2) == [(0, "0"), (1, "1")]
    assert D.pool_slots(2, None, "2,3") == [(0, "2"), (1, "3")]
    assert D.pool_slots(2, [1], "2,3") == [(1, "3")]
    assert D.pool_slots(4, [2, 0]) == [(2, "2"), (0, "0")]
    assert D.pool_slots(2, None, "GPU-a, GPU-b") == [(0, "GPU-a"), (1, "GPU-b")]
    from fastcert.config import ConfigError

    with pytest.raises(ConfigError, match=r"devices=\[2\].*CUDA_VISIBLE_DEVICES=2,3"):
        D.pool_slots(2, [2], "2,3")
    assert D.parse_devices(None) is None
    assert D.parse_devices("0,2") == [0, 2]
    assert D.parse_devices(1) == [1]
    assert D.parse_devices("null") is None
    with pytest.raises(ConfigError):
        D.parse_devices([0, 0])
    with pytest.raises(ConfigError):
        D.parse_devices(["a"])


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with ``n`` fake devices; returns the list of set_device calls."""
    import torch

    calls: list[int] = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(int(i)))
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        return calls

    return install


def _external(lock_dir, keys):
    """Another process's view: a pool holding the devices with these lock keys."""
    pools = [DevicePool([0], lock_dir=lock_dir, keys=[k]) for k in keys]
    for p in pools:
        assert p.try_acquire() is not None
    return pools


def test_acquire_device_takes_the_first_free_gpu(fake_cuda, tmp_path):
    calls = fake_cuda(2)
    lock_dir = tmp_path / "locks"
    busy = _external(lock_dir, ["0"])
    device = D.acquire_device("auto", None)
    assert str(device) == "cuda:1" and calls == [1]
    assert D.acquire_device("auto", None) == device  # same job: same lease
    assert D.held_device() == device
    probe = DevicePool([1], lock_dir=lock_dir)
    assert probe.try_acquire() is None
    D.release_device()
    assert D.held_device() is None and probe.try_acquire() == 1
    probe.release(), busy[0].release()


def test_acquire_device_honours_visible_devices_and_devices(fake_cuda, monkeypatch, tmp_path):
    calls = fake_cuda(2)
    lock_dir = tmp_path / "locks"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    busy = _external(lock_dir, ["5"])  # physical GPU 5 = visible index 0
    assert str(D.acquire_device("auto", None)) == "cuda:1"
    assert any("cuda7" in p.name for p in lock_dir.iterdir())
    D.release_device()
    busy[0].release()
    assert str(D.acquire_device("auto", [1])) == "cuda:1"  # 0 is free but not in devices
    D.release_device()
    assert calls == [1, 1]
    from fastcert.config import ConfigError

    with pytest.raises(ConfigError, match="not among the 2 visible"):
        D.acquire_device("auto", [2])


def test_acquire_device_waits_then_times_out(fake_cuda, tmp_path):
    fake_cuda(2)
    busy = _external(tmp_path / "locks", ["0", "1"])
    with pytest.raises(DeviceBusyError, match="FASTCERT_DEVICE_TIMEOUT"):
        D.acquire_device("auto", None, timeout=0.2, poll=0.05)
    for p in busy:
        p.release()


def test_single_gpu_uses_it_without_a_lock_unless_multirun(fake_cuda, monkeypatch, tmp_path):
    calls = fake_cuda(1)
    lock_dir = tmp_path / "locks"
    assert str(D.acquire_device("auto", None)) == "cuda:0" and calls == [0]
    assert not lock_dir.exists() and D.held_device() is None
    monkeypatch.setattr(D, "multirun_active", lambda: True)
    assert str(D.acquire_device("auto", None)) == "cuda:0"
    assert D.held_device() is not None and any(lock_dir.iterdir())


def test_multirun_detected_from_hydra_config(compose):
    from hydra.core.hydra_config import HydraConfig

    assert not D.multirun_active()
    cfg = compose(["hydra.mode=MULTIRUN"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert D.multirun_active()
    finally:
        HydraConfig.instance().cfg = None


def test_slurm_gpus_are_used_as_given(fake_cuda, monkeypatch, tmp_path):
    calls = fake_cuda(1)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    monkeypatch.setattr(D, "multirun_active", lambda: True)
    assert str(D.acquire_device("auto", None)) == "cuda:0" and calls == [0]
    assert D.held_device() is None and not (tmp_path / "locks").exists()
    fake_cuda(2)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a submitit task with 2 GPUs: cuda:0
    assert str(D.acquire_device("auto", None)) == "cuda:0" and D.held_device() is None
    monkeypatch.delenv(D.LOCK_DIR_ENV)
    assert D.default_lock_dir().name == f"fastcert-devices-{os.getuid()}-slurm4242"


def test_explicit_devices_are_honoured(fake_cuda, tmp_path):
    calls = fake_cuda(2)
    assert str(D.acquire_device("cuda:1", [0])) == "cuda:1" and calls == [1]
    assert str(D.acquire_device("cuda", None)) == "cuda"
    assert str(D.acquire_device("cpu", None)) == "cpu"
    assert D.held_device() is None and not (tmp_path / "locks").exists()
    from fastcert.config import ConfigError

    with pytest.raises(ConfigError, match="only 2 CUDA"):
        D.acquire_device("cuda:2", None)
    with pytest.raises(ConfigError):
        D.acquire_device("tpu:0", None)


def test_cpu_fallback(fake_cuda, tmp_path):
    fake_cuda(0)
    for spec, devs in (("auto", None), (None, None), ("auto", [0, 1]), ("pool", None)):
        assert str(D.acquire_device(spec, devs)) == "cpu"
    assert not (tmp_path / "locks").exists()
    from fastcert.config import ConfigError

    with pytest.raises(ConfigError, match="CUDA is not available"):
        D.acquire_device("cuda:0", None)


def test_default_n_jobs(fake_cuda):
    fake_cuda(0)
    assert D.default_n_jobs() == 2 and D.default_n_jobs(cpu_jobs=3) == 3
    assert D.default_n_jobs([0, 2, 3]) == 3
    fake_cuda(4)
    assert D.default_n_jobs() == 4 and D.default_n_jobs("1") == 1
