"""Every entry point honours ``cpu_threads`` (torch's CPU thread count): the run, certify, the
benchmark and the experiment scripts. Each call starts from 3 threads and must leave torch
with the configured 1 (two or more spin against each other on a small or busy machine:
up to 65x slower with two threads on a loaded 2-core machine)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


@pytest.fixture
def three_threads():
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(1)


def test_run(compose, tmp_path, three_threads):
    from fastcert.pipeline import run

    run(compose(TINY + ["epochs=1", "cpu_threads=1"]), tmp_path / "run")
    assert torch.get_num_threads() == 1


def test_certify(compose, tmp_path):
    from fastcert.certify import certify
    from fastcert.pipeline import run

    from conftest import compose_config

    run(compose(TINY + ["epochs=1"]), tmp_path / "run")
    cfg = compose_config("certify", [f"checkpoint={tmp_path / 'run' / 'last.pt'}",
                                     "verifiers=[ibp]", "attack=pgd", "attack.steps=1",
                                     "limit_test=8", "cpu_threads=1", "device=cpu",
                                     "progress=false"])
    torch.set_num_threads(3)
    try:
        certify(cfg, tmp_path / "certify")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_bench(tmp_path, three_threads):
    from experiments.bench import main

    main(["--quick", "--reps", "1", "--methods", "natural", "--no-memory", "--cpu-threads", "1",
          "--out", str(tmp_path)])
    assert torch.get_num_threads() == 1


def test_init_gain(three_threads, capsys):
    from experiments.init_gain import main

    main(["--trials", "1", "--fan-ins", "27", "--cpu-threads", "1"])
    assert torch.get_num_threads() == 1


def test_ablation_digits(tmp_path, three_threads):
    from experiments.ablation_digits import main

    main(["--seeds", "0", "--methods", "ibp", "--out", str(tmp_path), *TINY, "epochs=1",
          "eval.verifiers=[ibp]", "cpu_threads=1"])
    assert torch.get_num_threads() == 1


def test_allocators_passes_no_allocator_variable_on(monkeypatch):
    """The ``glibc`` row is the C library's default even when the shell preloads another
    allocator or tunes glibc's."""
    from experiments import allocators

    for key, value in (("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"), ("GLIBC_TUNABLES",
                       "glibc.malloc.mmap_threshold=1"), ("MALLOC_ARENA_MAX", "1"),
                       ("MALLOC_CONF", "dirty_decay_ms:-1"), ("OMP_PROC_BIND", "true")):
        monkeypatch.setenv(key, value)
    env = allocators._allocator_free_env()
    assert not {"LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_CONF"} & set(env)
    assert env["OMP_PROC_BIND"] == "true"


@pytest.mark.skipif("[always]" in _read("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="transparent huge pages always on: a 64 MiB region faults in as "
                           "32 huge pages, not 16384 small ones")
def test_allocators_compares_in_fresh_processes():
    """experiments.allocators: the default glibc allocator faults its freed memory back in every
    IBP step; fastcert's mallopt setting does not (CNN-7 at full width, batch 8, the median of
    three timed steps: the first after the warm-up may still grow mallopt's heap).

    Full width, because glibc ``mmap``s every request above 32 MiB whatever its dynamic threshold
    says: the 32768×512 layer's gradient (64 MiB) alone is 16384 pages faulted back per step.
    Below that size glibc's threshold adapts and the two settings fault a similar few thousand
    pages a step, so a narrow CNN-7 compares noise (it once failed on a CI machine that way)."""
    from experiments import allocators

    summary = allocators.main(["--rounds", "1", "--steps", "3", "--width", "1.0", "--batch", "8"])
    assert {"glibc/natural", "glibc/ibp", "mallopt/natural", "mallopt/ibp"} <= set(summary)
    pages = 32768 * 512 * 4 // 4096
    assert summary["glibc/ibp"]["faults_median"] >= pages
    assert summary["mallopt/ibp"]["faults_median"] < summary["glibc/ibp"]["faults_median"] / 4
