"""Data-parallel runs (fastcert.distributed), tested without a GPU: two ranks on the gloo
backend on the CPU, spawned by ``nproc=2`` and started by ``torchrun``.

Tolerance: a 2-rank run sums its gradients and BatchNorm statistics in another order than one
process, so it equals the 1-process run (same global batch) up to float32 rounding: trained
parameters within 1e-5 (absolute), epoch losses and accuracies within 1e-5 (relative), the
fractions of active/inactive ReLUs within 1e-4 (a few neurons whose bound is 0 up to
rounding), test accuracies equal. The plot-only regulariser values are ratios of batch means
that each rank computes on its share: not compared. Ranks among themselves are bitwise
identical, and a resumed 2-rank run equals an uninterrupted one.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastcert.methods import IBP
from fastcert.pipeline import run

from conftest import ROOT, TINY, compose_config

CHECK_DIR = "FASTCERT_TEST_RANK_CHECKS"   # where CheckedIBP writes (set by the tests)
DIE_AT = "FASTCERT_TEST_DIE_AT_STEP"      # CheckedIBP raises at this step (a preempted run)

# digits, a tiny CNN-7 (BatchNorm2d and BatchNorm1d), ε=0 / ramp / final epochs; 101 training
# examples in batches of 16: the last batch of 5 splits 3 + 2 (uneven loss weights); 3 test
# batches of 16: rank 0 evaluates two, rank 1 one.
# SGD: Adam divides each gradient by its own running RMS, so a parameter whose true gradient
# is 0 (a convolution bias before BatchNorm) moves by ±lr per step on rounding noise alone,
# differently in any two summation orders; with SGD every difference stays at rounding size.
# The learning rate keeps the run well-conditioned: at lr 0.01 this IBP run's loss goes 2.0 ->
# 78.6 -> 14.1 and amplifies float32 reduction-order differences (the ranks' summation order,
# or another CPU's kernels: ATEN_CPU_CAPABILITY) to 1e-4 relative; at lr 0.001 the records and
# parameters of the two runs agree to 2e-7 under both the default and the AVX2 kernels.
ARGS = TINY + ["model=cnn7", "model.width=0.125", "epochs=3", "schedule.start=1",
               "schedule.length=1", "data.batch_size=16", "data.limit_train=101",
               "data.test_batch_size=16", "eval.verifiers=[ibp,crown]",
               f"method._target_={__name__}.CheckedIBP", "optim._target_=fastcert.optim.SGD",
               "optim.lr=0.001", "init=ibp", "eps=0.002"]
ACC_KEYS = ("clean_acc", "pgd_acc", "ibp_verified_acc", "crown_verified_acc")


def _state(net) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in
                      [*net.model.parameters(), *net.model.buffers()]])


@dataclass
class CheckedIBP(IBP):
    """IBP that, before every step, all-gathers the parameters and BatchNorm buffers and
    checks that every rank holds exactly the same; each rank saves its final state at exit."""

    def step(self, net, batch):
        from fastcert import distributed

        ctx = distributed.current()
        if ctx is not None:
            state = _state(net)
            states = distributed.gather(state)
            assert all(torch.equal(states[0], s) for s in states), "ranks diverged"
            self._steps = getattr(self, "_steps", 0) + 1
            out = Path(os.environ[CHECK_DIR])
            (out / f"rank{ctx.rank}.steps").write_text(str(self._steps))
            if not getattr(self, "_registered", False):
                atexit.register(lambda: torch.save(_state(net), out / f"rank{ctx.rank}.pt"))
                self._registered = True
            if int(os.environ.get(DIE_AT, "0")) == self._steps:
                raise RuntimeError("preempted (test)")
        return super().step(net, batch)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_records(a: list[dict], b: list[dict], rel: float, plots: bool = True) -> None:
    """Records equal within ``rel``; ``plots=False`` skips the plot-only regulariser values
    (ratios of batch means: each rank computes them on its share)."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key == "epoch_time_s" or (not plots and key.startswith("reg/")):
                continue
            if isinstance(value, str):
                assert rb[key] == value, (ra["epoch"], key)
            elif key.startswith("relu_") and plots is False:  # counts of neurons at 0 ± 1e-7
                assert rb[key] == pytest.approx(value, rel=0, abs=1e-4), (ra["epoch"], key)
            else:
                assert rb[key] == pytest.approx(value, rel=rel, abs=1e-7), (ra["epoch"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process run and one 2-rank run (nproc=2) of the same config."""
    base = tmp_path_factory.mktemp("dp")
    checks = base / "checks"
    checks.mkdir()
    os.environ[CHECK_DIR] = str(checks)
    try:
        one_cfg = compose_config("config", ARGS)
        two_cfg = compose_config("config", ARGS + ["nproc=2"])
        one = run(one_cfg, base / "one")
        two = run(two_cfg, base / "two")
    finally:
        del os.environ[CHECK_DIR]
    return base, one, two


def test_two_ranks_train_the_one_process_model(runs):
    base, one, two = runs
    for key in ACC_KEYS:
        assert two[key] == one[key], key
    assert two["crown_verified_acc"] is not None
    _same_records(_records(base / "one"), _records(base / "two"), rel=1e-5, plots=False)
    a = torch.load(base / "one" / "last.pt", weights_only=False)["model"]
    b = torch.load(base / "two" / "last.pt", weights_only=False)["model"]
    assert any("running_var" in k for k in a)
    for name in a:
        torch.testing.assert_close(b[name].double(), a[name].double(), rtol=0, atol=1e-5,
                                   msg=name)


def test_ranks_hold_identical_parameters_after_every_step(runs):
    checks = runs[0] / "checks"
    steps = 3 * 7  # 3 epochs of ceil(101 / 16) batches
    assert [(checks / f"rank{r}.steps").read_text() for r in (0, 1)] == [str(steps)] * 2
    final = [torch.load(checks / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(final[0], final[1])


def test_only_rank_0_writes(runs):
    base = runs[0]
    names = sorted(p.name for p in (base / "two").iterdir())
    assert names == ["last.pt", "metrics.jsonl", "results.json"], names
    assert len(_records(base / "two")) == 3


def test_a_preempted_two_rank_run_resumes_to_the_same_result(runs, compose, tmp_path,
                                                            monkeypatch):
    base, _, two = runs
    monkeypatch.setenv(CHECK_DIR, str(tmp_path))
    monkeypatch.setenv(DIE_AT, "10")  # epoch 2, third batch
    with pytest.raises(Exception, match="preempted"):
        run(compose(ARGS + ["nproc=2"]), tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1
    monkeypatch.delenv(DIE_AT)
    got = run(compose(ARGS + ["nproc=2"]), tmp_path / "run", resume=True)
    for key in ACC_KEYS:
        assert got[key] == two[key], key
    _same_records(_records(base / "two"), _records(tmp_path / "run"), rel=1e-9)


def test_torchrun_starts_the_same_run(runs, tmp_path):
    """``torchrun --nproc_per_node=2 -m fastcert.run``: one run dir (Hydra's ``now`` is rank
    0's on every rank), Hydra's own files written once, the 2-rank results."""
    base, _, two = runs
    run_dir = tmp_path / "tr"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", CHECK_DIR: str(tmp_path)}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "fastcert.run", *ARGS,
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((run_dir / "results.json").read_text())
    for key in ACC_KEYS:
        assert got[key] == two[key], key
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert proc.stdout.count("clean accuracy") == 1  # rank 0 prints the table
    # no run dirs from a differing timestamp (the default outputs/DATE/TIME of a later second)
    assert not (tmp_path / "outputs").exists()


def test_nproc_is_checked(compose, monkeypatch):
    from fastcert.config import ConfigError
    from fastcert.settings import validate

    with pytest.raises(ConfigError, match="nproc=0"):
        validate(compose(TINY + ["nproc=0"]))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="under torchrun"):
        validate(compose(TINY + ["nproc=2"]))


def test_syncbatchnorm_is_traced_as_a_local_batchnorm():
    """Why fastcert all-reduces BatchNorm statistics itself: auto_LiRPA traces the model in
    eval mode, where nn.SyncBatchNorm is a plain batch_norm, so the BoundedModule gets an
    ordinary BoundBatchNormalization that would use each rank's own statistics; and
    SyncBatchNorm refuses CPU tensors in training (no gloo test)."""
    from fastcert.bounds import BoundedNet, auto_lirpa

    BoundBatchNormalization = auto_lirpa().BoundBatchNormalization

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(144, 10)))
    assert isinstance(model[1], torch.nn.SyncBatchNorm)
    net = BoundedNet(model, torch.rand(2, 1, 8, 8), 10)
    nodes = [type(n) for n in net.bounded.modules() if isinstance(n, BoundBatchNormalization)]
    assert nodes == [BoundBatchNormalization]
    import torch.distributed as dist

    from fastcert.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match="GPU"):
            model.train()(torch.rand(4, 1, 8, 8))
    finally:
        dist.destroy_process_group()


# ---- one step of fit, 2 ranks vs one process ------------------------------------------------

STEP_CASES = [("ibp", 0.0, 1, "full"), ("ibp", 0.05, 1, "full"), ("crown_ibp", 0.05, 1, "full"),
              ("ibp", 0.05, 2, "none")]  # the last: two accumulation chunks (DDP's no_sync)


class _OneBatch:
    """A training loader of one batch (this rank's share of it) for fit."""

    def __init__(self, x, y, global_size):
        self.x, self.y, self.global_sizes, self.generator = x, y, [global_size], None

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.x, self.y


def _one_step(case, run_dir, ctx=None) -> torch.Tensor:
    """The parameter update of one fit step of ``case`` on 7 digits-shaped images (a 2-rank
    run splits them 4 + 3)."""
    from fastcert import distributed
    from fastcert.bounds import BoundedNet
    from fastcert.config import build_option
    from fastcert.loggers import NullLogger
    from fastcert.schedules import LinearSchedule
    from fastcert.train import TrainSetup, fit

    method, eps, chunks, bn = case
    Path(run_dir).mkdir(parents=True)
    torch.manual_seed(0)
    model = build_option("model", "cnn7", {"width": 0.125, "bn": bn}, input_shape=(1, 8, 8),
                         num_classes=10)
    build_option("init", "ibp")(model, seed=0)
    if ctx is not None:
        distributed.sync_batchnorm(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(7, 1, 8, 8, generator=g), torch.randint(0, 10, (7,), generator=g)
    net = BoundedNet(model, x[:2], 10).train()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    share = slice(None) if ctx is None else slice(ctx.rank, None, ctx.world)
    optim = build_option("optim", "adam", {"_target_": "fastcert.optim.SGD", "lr": 0.01,
                                           "grad_acc_steps": chunks})
    fit(TrainSetup(net=net, method=build_option("method", method),
                   train_loader=_OneBatch(x[share], y[share], 7),
                   box_fn=lambda c, r: ((c - r).clamp(0, 1), (c + r).clamp(0, 1)),
                   schedule=LinearSchedule(0, 2, eps_target=eps * 2, steps_per_epoch=1),
                   optim=optim, epochs=1, seed=0, device=torch.device("cpu"),
                   run_dir=Path(run_dir), logger=NullLogger(), dist=ctx))
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def _rank_steps(ctx, out_dir):
    torch.set_num_threads(1)
    for i, case in enumerate(STEP_CASES):
        delta = _one_step(case, Path(out_dir) / f"r{ctx.rank}-{i}", ctx)
        if ctx.rank == 0:
            torch.save(delta, Path(out_dir) / f"delta{i}.pt")


def test_one_fit_step_on_two_ranks_is_the_whole_batch_step(tmp_path):
    """fit's step (DDP over the method step, global BatchNorm statistics, loss weights 2·4/7
    and 2·3/7, gradient accumulation): the parameter update equals the one-process update of
    the whole batch to 1e-5 relative — natural (ε=0), IBP, CROWN-IBP with loss fusion."""
    from fastcert import distributed

    distributed.spawn(_rank_steps, (str(tmp_path),), [torch.device("cpu")] * 2)
    for i, case in enumerate(STEP_CASES):
        want = _one_step(case, tmp_path / f"one-{i}")
        got = torch.load(tmp_path / f"delta{i}.pt")
        assert want.norm() > 0
        assert (got - want).norm() <= 1e-5 * want.norm(), (case, (got - want).norm() / want.norm())


# ---- what the parent process refuses before spawning; errors by type ----------------------

def _no_spawn(*args, **kwargs):
    raise AssertionError("spawned ranks for a run that should have been refused")


def test_a_changed_config_on_resume_is_refused_before_spawning(runs, compose, monkeypatch):
    """nproc=2: the resume check runs in the parent, so the one-line ConfigError (exit 2)
    names the changed key instead of the ranks' tracebacks."""
    from fastcert import distributed
    from fastcert.config import ConfigError

    base, _, _ = runs
    monkeypatch.setattr(distributed, "spawn", _no_spawn)
    cfg = compose(ARGS + ["nproc=2", "seed=1", "resume.checkpoint=last"])
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        run(cfg, base / "one")


def test_gradient_accumulation_is_refused_for_data_parallel_runs(compose, monkeypatch, tmp_path):
    from fastcert import distributed
    from fastcert.config import ConfigError

    monkeypatch.setattr(distributed, "spawn", _no_spawn)
    with pytest.raises(ConfigError, match=r"optim.grad_acc_steps=2 with 2 data-parallel ranks"):
        run(compose(ARGS + ["nproc=2", "optim.grad_acc_steps=2"]), tmp_path / "run")


def test_a_violation_recorded_by_the_ranks_is_raised_as_such(compose, monkeypatch, tmp_path):
    """Rank 0 writes results.json with the violation and the ranks fail; the parent raises
    SoundnessError (exit 3), not the spawn's generic error."""
    from fastcert import distributed
    from fastcert.evaluate import SoundnessError

    def ranks_that_found_a_violation(fn, args, devices):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "results.json").write_text(json.dumps(
            {"soundness": {"violations": [{"index": 3, "verifier": "ibp"}], "ties": 0}}))
        raise RuntimeError("process 0 terminated with an exception")

    monkeypatch.setattr(distributed, "spawn", ranks_that_found_a_violation)
    with pytest.raises(SoundnessError, match=r"1 soundness violation"):
        run(compose(ARGS + ["nproc=2"]), tmp_path / "run")


# ---- the methods' random draws: independent per rank, rank 0 the one-process stream ---------

@dataclass
class _DrawRecorder(IBP):
    """Natural training (ε=0) that records one global-RNG draw per step, as an attack's
    random start would make."""

    out_dir: str = ""

    def step(self, net, batch):
        from fastcert import distributed

        ctx = distributed.current()
        torch.save(torch.rand(5), Path(self.out_dir) / f"draw-{0 if ctx is None else ctx.rank}"
                                                        f"-{0 if ctx is None else ctx.world}.pt")
        return super().step(net, batch)


def _draw_fit(out_dir, ctx=None):
    from fastcert.bounds import BoundedNet
    from fastcert.config import build_option
    from fastcert.loggers import NullLogger
    from fastcert.schedules import LinearSchedule
    from fastcert.train import TrainSetup, fit

    torch.manual_seed(0)
    model = build_option("model", "mlp", {"widths": [8]}, input_shape=(1, 8, 8), num_classes=10)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    share = slice(None) if ctx is None else slice(ctx.rank, None, ctx.world)
    run_dir = Path(out_dir) / ("fit" if ctx is None else f"fit-rank{ctx.rank}")
    run_dir.mkdir()
    fit(TrainSetup(net=BoundedNet(model, x[:2], 10).train(), method=_DrawRecorder(out_dir=out_dir),
                   train_loader=_OneBatch(x[share], y[share], 6),
                   box_fn=lambda c, r: (c - r, c + r),
                   schedule=LinearSchedule(0, 0, eps_target=0.0, steps_per_epoch=1),
                   optim=build_option("optim", "adam"), epochs=1, seed=0,
                   device=torch.device("cpu"), run_dir=run_dir, logger=NullLogger(), dist=ctx))


def _rank_draws(ctx, out_dir):
    torch.set_num_threads(1)
    _draw_fit(out_dir, ctx)


def test_ranks_draw_their_own_random_numbers(tmp_path):
    """Attack starts of two ranks are independent draws (not the same noise on both shares),
    and rank 0 draws what a one-process run draws."""
    from fastcert import distributed

    distributed.spawn(_rank_draws, (str(tmp_path),), [torch.device("cpu")] * 2)
    _draw_fit(str(tmp_path))
    one, r0, r1 = (torch.load(tmp_path / f"draw-{k}.pt") for k in ("0-0", "0-2", "1-2"))
    assert torch.equal(r0, one) and not torch.equal(r0, r1)
