"""Preemption and resume: a run SIGKILLed mid-epoch and restarted with
``resume.checkpoint=last`` ends with the same numbers as one that was never interrupted, and
continues the same W&B run; a damaged checkpoint is an error naming the file, never a silent
restart.

The kill test runs ``python -m fastcert.run`` exactly as a user (or a preempted cluster job)
would, with one torch thread in every process (a deterministic setting: CPU kernels then sum
in the same order in all three processes).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcert.checkpoint import CheckpointError, save_atomic
from fastcert.data import Digits
from fastcert.pipeline import run

from conftest import ROOT, TINY, compose_config
from test_wandb import OfflineRun, offline_runs, wandb_env

EPOCHS = 4
# digits, all 1437 training images in batches of 32 (45 steps, ~1-3 s an epoch here), the FAST
# method (IBP init, BatchNorm, warmup regularisers), eps0 / ramp / ramp / final epochs.
KILL_ARGS = ["debug=smoke", "device=cpu", "method=fast", f"epochs={EPOCHS}", "schedule.start=1",
             "schedule.length=2", "data.limit_train=null", "data.limit_test=48",
             "data.batch_size=32", "eval.verifiers=[ibp,crown]"]
ACC_KEYS = ("clean_acc", "pgd_acc", "ibp_verified_acc", "crown_verified_acc", "any_verified_acc")
TIMEOUT_S = 900  # per process; generous for a loaded 2-core machine


def _env(root: Path) -> dict:
    return {**os.environ, **wandb_env(root), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(args, root: Path, log: Path) -> subprocess.Popen:
    # A new session: the kill below reaches this process and everything it started (W&B's
    # service included), like a preempted job, and nothing else.
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "fastcert.run", *args], cwd=root,
                                env=_env(root), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run did not finish in {TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-4000:]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def _kill_mid_epoch(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    """Wait for the first checkpoint, then SIGKILL the run about half an epoch later."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ((run_dir / "last.pt").exists() and _metrics(run_dir)):
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc={proc.returncode}) before it could be killed:\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint after {TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    time.sleep(0.5 * _metrics(run_dir)[-1]["epoch_time_s"])
    assert proc.poll() is None, "the run finished before it could be killed: make epochs longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _assert_same_record(a: dict, b: dict, where: str) -> None:
    assert set(a) == set(b), where
    for key in a:
        if key == "epoch_time_s":
            continue
        va, vb = a[key], b[key]
        if isinstance(va, float):
            assert vb == pytest.approx(va, rel=0, abs=1e-6), (where, key)
        elif isinstance(va, list):
            assert vb == pytest.approx(va, rel=0, abs=1e-6), (where, key)
        else:
            assert va == vb, (where, key)


def test_killed_mid_epoch_and_resumed_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    # The uninterrupted reference runs beside the run that will be killed (same settings, no
    # W&B: logging must not change what is trained).
    ref = _start(KILL_ARGS + [f"hydra.run.dir={ref_dir}"], tmp_path, tmp_path / "ref.log")
    args = KILL_ARGS + ["logger=wandb", "logger.log_every=5", f"hydra.run.dir={run_dir}"]
    victim = _start(args, tmp_path, tmp_path / "killed.log")
    try:
        _kill_mid_epoch(victim, run_dir, tmp_path / "killed.log")
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    ckpt = torch.load(run_dir / "last.pt", weights_only=False)
    killed_at = ckpt["epoch"]
    print(f"killed with last.pt at epoch {killed_at}, {len(_metrics(run_dir))} metrics lines")
    assert 1 <= killed_at < EPOCHS, killed_at
    assert not (run_dir / "results.json").exists()
    assert len(_metrics(run_dir)) in (killed_at, killed_at + 1)  # +1: killed before the save

    resumed = _start(args + ["resume.checkpoint=last"], tmp_path, tmp_path / "resumed.log")
    _wait(resumed, tmp_path / "resumed.log")
    _wait(ref, tmp_path / "ref.log")

    # final results: identical
    want = json.loads((ref_dir / "results.json").read_text())
    got = json.loads((run_dir / "results.json").read_text())
    for key in ACC_KEYS:
        assert got[key] == want[key], (key, got[key], want[key])
    assert got["crown_verified_acc"] is not None
    # every epoch's record: the killed process's epochs up to the checkpoint, then the resumed
    # process's, equal to the uninterrupted run's (losses, accuracies, ReLU states, ε, λ, LR)
    ref_rec, got_rec = _metrics(ref_dir), _metrics(run_dir)
    assert [r["epoch"] for r in got_rec] == [r["epoch"] for r in ref_rec] == [1, 2, 3, 4]
    for a, b in zip(ref_rec, got_rec):
        _assert_same_record(a, b, f"epoch {a['epoch']} (killed after epoch {killed_at})")
    # the trained weights, BN statistics, optimiser and LR-scheduler state: identical
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (ref_dir, run_dir))
    assert a["epoch"] == b["epoch"] == EPOCHS
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), rtol=0, atol=1e-6), name
    assert any("running_mean" in name for name in a["model"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.allclose(v.float(), b["optimizer"]["state"][pid][k].float(),
                                  rtol=0, atol=1e-6), (pid, k)

    _assert_one_wandb_run_across_processes(run_dir, ckpt, b, killed_at, got)


def _assert_one_wandb_run_across_processes(run_dir, ckpt: dict, final: dict, killed_at: int,
                                           got: dict):
    """W&B: one run id across both processes, the resumed process logging the later epochs
    (``ckpt``: the killed process's last.pt, ``final``: the resumed one's, ``got``: its
    results.json)."""
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert ckpt["logger_run_id"] == final["logger_run_id"] == run_id
    files = offline_runs(run_dir)
    assert len(files) == 2, files
    # the killed process's log holds only what W&B had flushed when everything was killed
    first, second = OfflineRun(files[0], complete=False), OfflineRun(files[1])
    assert files[0].parent.name.endswith(f"-{run_id}") and first.id in (None, run_id)
    assert second.id == run_id
    assert second.run.get("resume") is True and second.exit_code == 0
    first_epochs = [r["epoch"] for r in first.rows("epoch/loss")]
    assert first_epochs == list(range(1, len(first_epochs) + 1)) and len(first_epochs) <= killed_at
    # the resumed process logs again the epochs up to the checkpoint (what the killed one may
    # not have flushed), then its own, all at explicit steps on one axis: epoch × 45 steps
    # (W&B keeps the first row it got for a step when both files are synced)
    steps = 45  # ceil(1437 / 32)
    rows = second.rows("epoch/loss")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert [r["_step"] for r in rows] == [e * steps for e in range(1, EPOCHS + 1)]
    for a, b in zip(rows, _metrics(run_dir)):
        assert a["epoch/loss"] == pytest.approx(b["loss"], rel=1e-12, abs=0)
    assert min(r["_step"] for r in second.history) >= steps   # no restart at step 0
    assert [r["_step"] for r in first.rows("epoch/loss")] == [e * steps for e in first_epochs]
    assert second.summary["clean_acc"] == got["clean_acc"]


# ---- damaged checkpoints -----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished TINY run dir (last.pt, metrics.jsonl, results.json), made once."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(compose_config("config", TINY), run_dir)
    return run_dir


class Preempted(BaseException):
    """Stands in for the process dying at a chosen point."""


def _interrupt_at(monkeypatch, where: str) -> None:
    import fastcert.checkpoint as checkpoint_module
    from fastcert.schedules import EpsSchedule

    if where == "mid_epoch":  # epoch 2, second batch (TINY: 2 batches an epoch)
        eps = EpsSchedule.eps

        def dying_eps(self, step):
            if step == 3:
                raise Preempted
            return eps(self, step)
        monkeypatch.setattr(EpsSchedule, "eps", dying_eps)
    else:  # "before_save": epoch 2's metrics line is written, its checkpoint is not
        save = checkpoint_module.save_atomic

        def dying_save(state, path):
            if state["epoch"] == 2:
                raise Preempted
            save(state, path)
        monkeypatch.setattr(checkpoint_module, "save_atomic", dying_save)


@pytest.mark.parametrize("where", ["mid_epoch", "before_save"])
def test_interrupted_at_a_chosen_point_resumes_exactly(finished_run, tmp_path, compose,
                                                       monkeypatch, where):
    """The same property as the kill test at two fixed points, in-process and quick."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, where)
        with pytest.raises(Preempted):
            run(compose(TINY), run_dir)
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 1
    assert len(_metrics(run_dir)) == (2 if where == "before_save" else 1)
    if where == "before_save":  # and the kill cut epoch 2's line short
        text = (run_dir / "metrics.jsonl").read_text()
        (run_dir / "metrics.jsonl").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2])
    got = run(compose(TINY), run_dir, resume=True)
    want = json.loads((finished_run / "results.json").read_text())
    for key in ACC_KEYS:
        assert got[key] == want[key], key
    ref_rec, got_rec = _metrics(finished_run), _metrics(run_dir)
    assert [r["epoch"] for r in got_rec] == [r["epoch"] for r in ref_rec] == [1, 2]
    for a, b in zip(ref_rec, got_rec):
        _assert_same_record(a, b, f"epoch {a['epoch']}")


class _Jittered(torch.utils.data.Dataset):
    """Digits with random noise drawn in ``__getitem__``: a stand-in for the random crops and
    flips of CIFAR-10 / TinyImageNet, which draw from torch's RNG in the loader's workers."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x + 0.1 * torch.rand_like(x)).clamp(0, 1), y


class DigitsJitter(Digits):
    """digits with random jitter as augmentation (a data set of this test only)."""

    def splits(self, seed):
        splits = super().splits(seed)
        splits.train = _Jittered(splits.train)
        return splits


def assert_resumes_identically(compose, over: list[str], tmp_path: Path, monkeypatch) -> None:
    """A run of ``over`` interrupted mid-epoch and resumed ends with the records and results
    of an uninterrupted one."""
    want = run(compose(over), tmp_path / "ref")
    with monkeypatch.context() as m:
        _interrupt_at(m, "mid_epoch")
        with pytest.raises(Preempted):
            run(compose(over), tmp_path / "run")
    got = run(compose(over), tmp_path / "run", resume=True)
    for a, b in zip(_metrics(tmp_path / "ref"), _metrics(tmp_path / "run"), strict=True):
        _assert_same_record(a, b, f"epoch {a['epoch']}")
    for key in ACC_KEYS:
        assert got[key] == want[key], key


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_randomness_survives_resume(compose, tmp_path, monkeypatch, workers):
    assert_resumes_identically(compose, TINY + [f"data._target_={__name__}.DigitsJitter",
                                                f"data.num_workers={workers}"],
                               tmp_path, monkeypatch)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_truncated_checkpoint_fails_naming_it_and_changes_nothing(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    ckpt = run_dir / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # killed mid-write
    before = _snapshot(run_dir)
    proc = subprocess.run([sys.executable, "-m", "fastcert.run", *TINY, "resume.checkpoint=last",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=_env(tmp_path))
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and str(ckpt) in proc.stderr, proc.stderr[-3000:]
    assert "truncated" in proc.stderr
    after = _snapshot(run_dir)
    for name in ("last.pt", "metrics.jsonl", "results.json"):
        assert after[name] == before[name], name   # nothing restarted, nothing overwritten
    assert not list(run_dir.glob(".last.pt.tmp*"))


@pytest.mark.parametrize("damage", ["garbage", "not_a_checkpoint", "empty"])
def test_damaged_checkpoint_by_path_is_an_error(finished_run, tmp_path, compose, damage):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    bad = tmp_path / "elsewhere" / "bad.pt"
    bad.parent.mkdir()
    if damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    elif damage == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(b"")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        run(compose(TINY), run_dir, resume=str(bad))
    assert _snapshot(run_dir) == before


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(finished_run, tmp_path,
                                                                   compose):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "last.pt").unlink()
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="last.pt"):
        run(compose(TINY), run_dir, resume=True)
    assert _snapshot(run_dir) == before


def test_fresh_run_in_a_used_dir_changes_nothing(finished_run, tmp_path, compose):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(compose(TINY), run_dir)                    # resume not asked for: refuse
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    good = path.read_bytes()

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for the process dying while writing

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path.read_bytes() == good                   # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


# ---- resuming checks the config ---------------------------------------------------------
@pytest.mark.parametrize("override,keys", [
    (["seed=1"], ["seed: 0 -> 1"]),
    (["method=fast"], ["method.name: 'ibp' -> 'fast'"]),
    (["model.widths=[8,8]"], ["model.widths: [256, 256] -> [8, 8]"]),
    (["eps=0.05", "schedule.length=2"], ["eps: 0.1 -> 0.05", "schedule.length: 1 -> 2"]),
])
def test_resume_refuses_a_changed_config_listing_the_keys(finished_run, tmp_path, compose,
                                                           override, keys):
    from fastcert.config import ConfigError

    run_dir = _copy_run(finished_run, tmp_path / "run")
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError, match="resume.allow_changes=true") as e:
        run(compose(TINY + override), run_dir, resume=True)
    for key in keys:
        assert key in str(e.value), str(e.value)
    assert _snapshot(run_dir) == before


def _without_time(record: dict) -> dict:
    """A ``resumed`` record without its ``at`` (an ISO 8601 UTC time, checked here)."""
    import datetime

    assert datetime.datetime.fromisoformat(record["at"]).tzinfo is not None
    return {k: v for k, v in record.items() if k != "at"}


def test_resume_allows_evaluation_and_location_changes(finished_run, tmp_path, compose):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    results = run(compose(TINY + ["data.root=/elsewhere", "eval.verifiers=[ibp,crown]",
                                  "epochs=2"]), run_dir, resume=True)
    assert [_without_time(r) for r in results["resumed"]] == [{"from_epoch": 2, "changes": {}}]


def test_allow_changes_resumes_and_records_the_changes(finished_run, tmp_path, compose):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    results = run(compose(TINY + ["seed=3", "resume.allow_changes=true"]), run_dir,
                  resume=True)
    assert [_without_time(r) for r in results["resumed"]] == [
        {"from_epoch": 2, "changes": {"seed": [0, 3]}}]
    assert json.loads((run_dir / "results.json").read_text())["resumed"][0]["changes"] == {
        "seed": [0, 3]}


def test_wall_time_after_a_resume_is_the_total(tmp_path, compose, monkeypatch):
    """results.json's wall_time_s counts the interrupted process up to its checkpoint and the
    resumed one, not the resumed process alone."""
    from fastcert.methods import IBP

    run_dir = tmp_path / "run"
    step = IBP.step

    def slow_step(self, net, batch):  # the first process's time dwarfs any start-up noise
        time.sleep(0.25)
        return step(self, net, batch)

    first = time.perf_counter()
    with monkeypatch.context() as m:
        m.setattr(IBP, "step", slow_step)
        _interrupt_at(m, "mid_epoch")
        with pytest.raises(Preempted):
            run(compose(TINY), run_dir)
    first = time.perf_counter() - first
    at_checkpoint = torch.load(run_dir / "last.pt", weights_only=False)["wall_time_s"]
    second = time.perf_counter()
    results = run(compose(TINY), run_dir, resume=True)
    second = time.perf_counter() - second
    epoch2 = _metrics(run_dir)[1]["epoch_time_s"]
    assert 0 < at_checkpoint < first
    assert at_checkpoint + epoch2 < results["wall_time_s"] <= at_checkpoint + second
    assert results["wall_time_s"] > second   # more than the resumed process alone


def test_where_data_lives_and_how_it_is_batched_may_change_on_resume():
    """Data location, workers, the on-device path (also of a two-class task's source) and test
    settings change how a run reads its data, not what it trains; a checkpoint written before a
    key existed (its config lacks it) is no change either."""
    from fastcert.resume import config_changes

    old = {"data": {"name": "mnist_2v5", "batch_size": 16,
                    "source": {"root": "/a", "download": False, "num_workers": 2}},
           "seed": 0}
    new = {"data": {"name": "mnist_2v5", "batch_size": 16, "on_device": False,
                    "source": {"root": "/b", "download": True, "num_workers": 0}},
           "seed": 0}
    assert config_changes(old, new) == {}
    new["data"]["batch_size"] = 32
    assert config_changes(old, new) == {"data.batch_size": (16, 32)}
