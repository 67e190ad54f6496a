"""The training loop (fastcert.train.fit): gradient accumulation splits a batch, per-step
numbers stay on the device, and an epoch's record does not depend on the logger."""
from __future__ import annotations

import json

import pytest
import torch

from fastcert.pipeline import run

from conftest import TINY


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_acc_steps_splits_each_batch_into_chunks(compose, tmp_path, monkeypatch):
    """``optim.grad_acc_steps = k`` (the released code of Shi et al. 2021): each batch is one
    optimiser step over k chunks of batch/k examples, so the batch size and the number of
    optimiser steps per epoch stay those of k = 1."""
    steps, chunk_sizes = [], []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    import fastcert.methods.ibp as ibp_module

    bounded_step = ibp_module.ibp_step

    def recording(net, batch, *args):
        chunk_sizes.append(len(batch.y))
        return bounded_step(net, batch, *args)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    monkeypatch.setattr(ibp_module, "ibp_step", recording)
    over = TINY + ["data.batch_size=32", "optim.grad_acc_steps=4", "epochs=1",
                   "data.limit_train=64"]
    run(compose(over), tmp_path / "acc")
    assert len(steps) == 2                        # 64 examples / batch 32: two optimiser steps
    assert chunk_sizes == [8] * 8                 # each batch in 4 chunks of 8


def _same_weights_with_four_chunks(compose, base: list[str], tmp_path, atol: float) -> None:
    """Runs of ``base`` with batches whole and in 4 accumulation chunks end with the same
    weights (to ``atol``)."""
    run(compose(base), tmp_path / "one")
    run(compose(base + ["optim.grad_acc_steps=4"]), tmp_path / "four")
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "four" / "last.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


def test_grad_acc_gives_the_full_batch_gradient_without_batchnorm(compose, tmp_path):
    """Without BatchNorm (whose statistics are per chunk) k chunks give exactly the gradient of
    the whole batch: the trained weights equal those of k = 1."""
    base = TINY + ["model.bn=none", "epochs=1", "data.batch_size=32", "data.limit_train=64",
                   "eval.verifiers=[ibp]"]
    _same_weights_with_four_chunks(compose, base, tmp_path, atol=1e-5)


def _count_host_reads(monkeypatch) -> list:
    """Record every ``tensor.item()`` / ``bool(tensor)`` made by fastcert's own code (torch's
    optimisers read their CPU step counters, which never wait on a device)."""
    import sys
    from pathlib import Path

    package = str(Path(__file__).resolve().parents[1] / "fastcert")
    calls = []

    def counted(original):
        def read(self):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                calls.append(sys._getframe(1).f_code.co_name)
            return original(self)
        return read

    monkeypatch.setattr(torch.Tensor, "item", counted(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counted(torch.Tensor.__bool__))
    return calls


class _Trained(Exception):
    """Raised instead of the final evaluation: only training is counted."""


@pytest.mark.parametrize("method", ["ibp", "fast", "crown_ibp"])
def test_no_host_read_per_training_step(compose, tmp_path, monkeypatch, method):
    """Per-step numbers accumulate as device tensors and are read at log points: the number of
    host reads in training does not grow with the number of steps (16 vs 32 per epoch)."""
    import fastcert.pipeline as pipeline

    def stop(*args, **kwargs):
        raise _Trained

    counts = {}
    for n in (16, 32):
        with monkeypatch.context() as m:
            m.setattr(pipeline, "evaluate", stop)
            calls = _count_host_reads(m)
            over = TINY + [f"method={method}", "data.batch_size=4", f"data.limit_train={4 * n}",
                           "epochs=1", "schedule.start=0", "schedule.length=1"]
            with pytest.raises(_Trained):
                run(compose(over), tmp_path / f"n{n}")
            counts[n] = len(calls)
    assert counts[16] == counts[32], counts


def test_epoch_records_do_not_depend_on_the_logging_cadence(compose, tmp_path):
    """ReLU states and regulariser values in metrics.jsonl come from a fixed set of steps, so a
    run with per-step logging records exactly what one without records."""
    over = TINY + ["method=fast", "data.batch_size=8", "epochs=2", "eval.verifiers=[ibp]"]
    run(compose(over), tmp_path / "quiet")
    run(compose(over + ["logger.log_every=3"]), tmp_path / "logged")
    for a, b in zip(_records(tmp_path / "quiet"), _records(tmp_path / "logged"), strict=True):
        a.pop("epoch_time_s"), b.pop("epoch_time_s")
        assert a == b
    assert "relu_unstable" in a and "reg/tightness" in a


def test_grad_acc_with_uneven_chunks_gives_the_full_batch_gradient(compose, tmp_path):
    """Chunks of unequal size (30 examples in 4 chunks: 8, 8, 8, 6) are weighted by their
    share of the batch, so the update is still the whole batch's (SGD: the update is the
    gradient itself)."""
    base = TINY + ["model.bn=none", "epochs=1", "data.batch_size=30", "data.limit_train=60",
                   "eval.verifiers=[ibp]", "optim._target_=fastcert.optim.SGD", "optim.lr=0.01"]
    _same_weights_with_four_chunks(compose, base, tmp_path, atol=1e-6)
    ra, rb = _records(tmp_path / "one"), _records(tmp_path / "four")
    assert rb[0]["loss"] == pytest.approx(ra[0]["loss"], rel=1e-5)


# ---- CUDA-only speed settings: channels-last and cuDNN's autotuner ---------------------------


def test_channels_last_batches_and_model_give_the_same_fp32_bounds(compose, monkeypatch,
                                                                   tmp_path):
    """channels_last=true (on CUDA by default; forced here on the CPU): the model and every
    training batch are channels-last, and the bounds are the contiguous layout's, in fp32
    (no autocast anywhere in a step)."""
    from fastcert.bounds import Bound
    from fastcert.pipeline import build
    from fastcert.settings import validate

    over = TINY + ["model=cnn7", "model.width=0.125"]
    dense = build(validate(compose(over + ["channels_last=false"])))
    last = build(validate(compose(over + ["channels_last=true"])))
    assert not dense.channels_last and last.channels_last
    conv = next(m for m in last.net.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = next(iter(dense.data.train))
    lower, upper = dense.data.eps_box(x, 0.05)
    for bound in (Bound.IBP, Bound.CROWN):
        _, want = dense.net.margin_bounds(x, y, lower, upper, bound)
        cl = torch.channels_last
        _, got = last.net.margin_bounds(x.contiguous(memory_format=cl), y,
                                        lower.contiguous(memory_format=cl),
                                        upper.contiguous(memory_format=cl), bound)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    import fastcert.methods.ibp as ibp_module

    seen = []
    bounded_step = ibp_module.ibp_step

    def recording(net, batch, *args):
        seen.append((batch.x.is_contiguous(memory_format=torch.channels_last),
                     torch.is_autocast_enabled("cpu")))
        out = bounded_step(net, batch, *args)
        assert out.loss.dtype == torch.float32
        return out

    monkeypatch.setattr(ibp_module, "ibp_step", recording)
    run(compose(over + ["channels_last=true", "epochs=1", "eval.verifiers=[ibp]"]), tmp_path)
    assert seen and all(s == (True, False) for s in seen), seen


def test_cuda_settings_stay_off_on_the_cpu(compose):
    from fastcert.pipeline import build, set_process
    from fastcert.settings import Speed, validate

    before = torch.backends.cudnn.benchmark
    built = build(validate(compose(TINY)))
    assert not built.channels_last and torch.backends.cudnn.benchmark == before
    try:
        set_process(1, Speed(), torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark is True
        set_process(1, Speed(cudnn_benchmark=False), torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_checkpoint(compose, tmp_path,
                                                                     monkeypatch):
    """A NaN loss in epoch 2 (TINY: 2 batches an epoch) stops the run with
    TrainingDiverged naming optim.lr; last.pt keeps epoch 1."""
    from fastcert.schedules import EpsSchedule
    from fastcert.train import TrainingDiverged

    eps = EpsSchedule.eps
    monkeypatch.setattr(EpsSchedule, "eps",
                        lambda self, step: float("nan") if step >= 2 else eps(self, step))
    with pytest.raises(TrainingDiverged, match=r"nan at epoch 2 .*last.pt keeps epoch 1.*"
                                               r"optim.lr"):
        run(compose(TINY), tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1
    assert [json.loads(r)["epoch"] for r in (tmp_path / "metrics.jsonl").read_text()
            .splitlines()] == [1]
