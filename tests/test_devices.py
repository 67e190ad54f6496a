"""Which device a run takes (fastcert.devices), tested without a GPU: a faked torch.cuda over
the file-lock pool (fastcert.device_pool, tested in test_device_pool.py)."""
from __future__ import annotations

import os

import pytest

from fastcert import device_pool as P
from fastcert import devices as D
from fastcert.device_pool import DeviceBusyError, DevicePool
from fastcert.resolvers import default_n_jobs


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                "SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
                "SUBMITIT_EXECUTOR", P.TIMEOUT_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(P.LOCK_DIR_ENV, str(tmp_path / "locks"))
    yield
    D.release_device()
    D._local.__dict__.clear()  # forget this thread's preferred device between tests


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
    monkeypatch.delenv(P.LOCK_DIR_ENV)
    assert P.default_lock_dir().name == f"fastcert-devices-{os.getuid()}-slurm4242"


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
    assert default_n_jobs() == 2 and default_n_jobs(cpu_jobs=3) == 3
    assert default_n_jobs([0, 2, 3]) == 3
    fake_cuda(4)
    assert default_n_jobs() == 4 and default_n_jobs("1") == 1
