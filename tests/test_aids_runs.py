"""The aids and model selection inside real runs: precise BatchNorm over the training set,
SWA's average as what last.pt and best.pt hold and the final evaluation reads, ReLU shrinking
invisible to certify, selection's record and best.pt, and a resumed run with SWA and selection
identical to an uninterrupted one."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import fastcert.aids as aids_module
import fastcert.aids.swa as swa_module
from fastcert.certify import certify
from fastcert.config import ConfigError
from fastcert.evaluate import evaluate
from fastcert.pipeline import run
from fastcert.rebuild import build_trained, load_trained
from fastcert.selection import TEST_SPLIT_WARNING
from test_aids import _bn_inputs
from test_resume import ACC_KEYS, Preempted, _assert_same_record, _interrupt_at, _metrics

from conftest import TINY, compose_config

SMALL = TINY + ["model.widths=[16,16]"]
#: SWA from epoch 1 at every step; only the last epoch reaches the test radius (ramp 0+3)
SWA_SELECT = SMALL + ["epochs=3", "schedule.start=0", "schedule.length=3", "aids.swa.start=1",
                      "aids.swa.every=1", "select.metric=clean_acc", "select.split=test"]


def _state(path):
    return torch.load(path, weights_only=False)


def _model(run_dir, name="last.pt"):
    trained = load_trained(compose_config("certify", [f"checkpoint={run_dir / name}"]))
    return build_trained(trained, torch.device("cpu"))


def test_precise_bn_is_the_average_over_the_training_batches(tmp_path, monkeypatch):
    passes = []
    original = aids_module.precise_statistics

    def recorded(model, batches):
        batches = list(batches)
        passes.append(batches)
        original(model, iter(batches))
    monkeypatch.setattr(aids_module, "precise_statistics", recorded)
    run(compose_config("config", SMALL + ["epochs=1", "aids.precise_bn=true"]), tmp_path)
    (batches,) = passes
    assert sum(len(x) for x in batches) == 96          # one pass over the whole training set
    built = _model(tmp_path)
    state = _state(tmp_path / "last.pt")["model"]
    bns = [k[:-len(".running_mean")] for k in state if k.endswith("running_mean")]
    inputs = _bn_inputs(built.net.model, batches)
    assert len(bns) == len(inputs) == 2
    for name, xs in zip(bns, inputs):
        mean = torch.stack([x.mean(0) for x in xs]).mean(0)
        var = torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0)
        assert torch.allclose(state[f"{name}.running_mean"], mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(state[f"{name}.running_var"], var, rtol=1e-5, atol=1e-6)


#: one plain SGD step (no momentum, no clipping) on one batch of 64
ONE_SGD_STEP = SMALL + ["epochs=1", "data.limit_train=64", "data.batch_size=64", "optim=sgd",
                        "optim.lr=0.1", "optim.momentum=0", "optim.grad_clip=1e9"]


def test_l1_moves_only_conv_and_linear_weights_by_lr_c_sign(tmp_path):
    """With SGD, one step of a run with aids.l1=c differs from the same step without it by
    −lr·c·sign(W₀) on every linear weight (W₀: the initial weights) and by nothing elsewhere
    (biases, BatchNorm)."""
    from fastcert.pipeline import build
    from fastcert.settings import validate

    cfg = compose_config("config", ONE_SGD_STEP)
    initial = build(validate(cfg), torch.device("cpu")).net.model
    run(cfg, tmp_path / "plain")
    run(compose_config("config", ONE_SGD_STEP + ["aids.l1=0.01"]), tmp_path / "l1")
    plain, l1 = (_state(tmp_path / d / "last.pt")["model"] for d in ("plain", "l1"))
    start = initial.state_dict()
    weights = {f"{n}.weight" for n, m in initial.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert len(weights) == 3
    for key, w in plain.items():
        if key in weights:
            assert torch.allclose(l1[key] - w, -0.1 * 0.01 * start[key].sign(), atol=1e-6), key
        else:
            assert torch.equal(l1[key], w), key
    assert _metrics(tmp_path / "l1")[0]["loss/l1"] > 0
    assert "loss/l1" not in _metrics(tmp_path / "plain")[0]


def test_edac_steps_before_the_training_step_and_its_gradient_is_kept(tmp_path, monkeypatch):
    """Per training step: EDAC's pre-step and its optimiser step, then the method's step on
    the pre-step's weights with the pre-step's gradient still in .grad, then the optimiser
    step on the sum."""
    import fastcert.train as train

    events = []
    first = {}

    def grad():
        return first["p"].grad.clone()

    pre_step = aids_module.EDAC.pre_step

    def edac(self, net, optimizer, *args):
        first.setdefault("p", next(net.model.parameters()))
        step = optimizer.step

        def recorded_step(*a, **k):
            events.append(("optimizer.step", grad()))
            return step(*a, **k)
        monkeypatch.setattr(optimizer, "step", recorded_step)
        events.append(("edac", None))
        return pre_step(self, net, optimizer, *args)

    method_step = train._Loop.method_step

    def method(self, *args, **kwargs):
        events.append(("method", grad()))
        return method_step(self, *args, **kwargs)

    monkeypatch.setattr(aids_module.EDAC, "pre_step", edac)
    monkeypatch.setattr(train._Loop, "method_step", method)
    run(compose_config("config", ONE_SGD_STEP + ["aids.edac.gamma=0.3"]), tmp_path)
    assert [e for e, _ in events] == ["edac", "optimizer.step", "method", "optimizer.step"]
    edac_grad, at_method, summed = events[1][1], events[2][1], events[3][1]
    assert torch.equal(at_method, edac_grad) and not torch.equal(summed, edac_grad)
    assert _metrics(tmp_path)[0]["loss/edac"] > 0


def test_swa_average_is_what_last_and_best_hold_and_what_is_evaluated(tmp_path, monkeypatch):
    snapshots, swaps = [], []
    after_step = swa_module.Averager.after_step
    update = swa_module.example_weighted_statistics

    def recorded_step(self, step):
        n = self.n_averaged
        after_step(self, step)
        if self.n_averaged > n:
            snapshots.append(copy.deepcopy(self.model))

    def recorded_bn(model, batches):
        batches = list(batches)
        swaps.append(batches)
        update(model, iter(batches))
    monkeypatch.setattr(swa_module.Averager, "after_step", recorded_step)
    monkeypatch.setattr(swa_module, "example_weighted_statistics", recorded_bn)
    with pytest.warns(UserWarning, match="select.split=test"):
        results = run(compose_config("config", SWA_SELECT), tmp_path)
    assert len(snapshots) == 4 and len(swaps) == 1  # steps 3..6 (t > 1·2), swapped once
    reference = AveragedModel(snapshots[0])
    for snap in snapshots:
        reference.update_parameters(snap)
    last, best = _state(tmp_path / "last.pt"), _state(tmp_path / "best.pt")
    built = _model(tmp_path)
    for (name, p), q in zip(built.net.model.named_parameters(), reference.module.parameters(),
                            strict=True):
        assert torch.equal(p, q), name
    inputs = _bn_inputs(built.net.model, swaps[0])
    sizes = torch.tensor([float(len(x)) for x in swaps[0]])
    running = [k for k in last["model"] if k.endswith("running_mean")]
    for name, xs in zip(running, inputs, strict=True):
        mean = sum(b * x.mean(0) for b, x in zip(sizes, xs)) / sizes.sum()
        assert torch.allclose(last["model"][name], mean, rtol=1e-5, atol=1e-6)
    assert best["epoch"] == 3 and results["selection"]["epoch"] == 3
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k
    again = evaluate(built.net, built.data.test, built.data.eps_box, results["eps"],
                     verifiers=["ibp"], pgd=built.settings.eval.pgd, seed=0).summary()
    for key in ("clean_acc", "pgd_acc", "ibp_verified_acc"):
        assert results[key] == again[key], key
    assert results["selection"]["split"] == "test"
    assert results["selection"]["warning"] == TEST_SPLIT_WARNING


def test_selection_keeps_the_best_epoch_in_best_pt(tmp_path):
    over = SMALL + ["epochs=4", "schedule.start=0", "schedule.length=1", "data.val_size=30",
                    "select.metric=clean_acc"]
    results = run(compose_config("config", over), tmp_path)
    scores = {r["epoch"]: r["select/clean_acc"] for r in _metrics(tmp_path)}
    assert sorted(scores) == [1, 2, 3, 4]          # the ramp ends with epoch 1
    best_epoch = max(scores, key=lambda e: (scores[e], -e))  # the first of the best
    sel = results["selection"]
    assert (sel["epoch"], sel["value"], sel["split"], sel["eligible_epochs"]) == (
        best_epoch, scores[best_epoch], "val", 4)
    assert "warning" not in sel and _state(tmp_path / "best.pt")["epoch"] == best_epoch
    built = _model(tmp_path, "best.pt")
    again = evaluate(built.net, built.data.val, built.data.eps_box, results["eps"],
                     verifiers=["ibp"], pgd=built.settings.eval.pgd, seed=0).summary()
    assert results["val_clean_acc"] == again["clean_acc"] == scores[best_epoch]


def test_selection_config_mistakes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="select.split=val needs a validation split"):
        run(compose_config("config", SMALL + ["select.metric=clean_acc"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="select.metric=robust_accu"):
        run(compose_config("config", SMALL + ["select.metric=robust_accu"]), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _certify(checkpoint, out, *overrides):
    cfg = compose_config("certify", [f"checkpoint={checkpoint}", "attack=pgd", "attack.steps=5",
                                     "progress=false", "verifiers=[ibp,crown]",
                                     "cascade=false", *overrides])
    return certify(cfg, out)


def test_relu_shrinking_changes_training_but_not_certify(tmp_path):
    over = SMALL + ["epochs=2", "eps=0.05", "optim.lr=5e-3"]
    run(compose_config("config", over), tmp_path / "plain")
    run(compose_config("config", over + ["aids.relu_shrinkage=0.8"]), tmp_path / "shr")
    first = [_metrics(tmp_path / d)[0]["loss"] for d in ("plain", "shr")]
    assert first[1] < first[0]   # shrunk upper bounds: a smaller robust loss
    ckpt = tmp_path / "shr" / "last.pt"
    assert _state(ckpt)["config"]["aids"]["relu_shrinkage"] == 0.8
    with_key = _certify(ckpt, tmp_path / "c1")
    without = _certify(ckpt, tmp_path / "c2", "run_overrides=['aids.relu_shrinkage=null']")
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "stages")}
             for r in with_key["results"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("time_s", "stages")}
                     for r in without["results"]]
    assert ((tmp_path / "c1" / "certify.csv").read_bytes()
            == (tmp_path / "c2" / "certify.csv").read_bytes())
    # the comparison would see a leak: certify inside the training context differs
    with aids_module.relu_shrinking(0.8):
        _certify(ckpt, tmp_path / "c3")
    assert ((tmp_path / "c3" / "certify.csv").read_bytes()
            != (tmp_path / "c1" / "certify.csv").read_bytes())


def test_resume_with_swa_and_selection_is_identical(tmp_path, monkeypatch):
    over = SMALL + ["epochs=3", "schedule.start=0", "schedule.length=1", "aids.swa.start=0",
                    "aids.swa.every=1", "select.metric=clean_acc", "data.val_size=30",
                    "aids.precise_bn=true", "aids.l1=1e-4"]
    want = run(compose_config("config", over), tmp_path / "ref")
    with monkeypatch.context() as m:
        _interrupt_at(m, "mid_epoch")          # epoch 2, after SWA's first snapshots
        with pytest.raises(Preempted):
            run(compose_config("config", over), tmp_path / "run")
    assert _state(tmp_path / "run" / "last.pt")["aids"]["swa"] is not None
    got = run(compose_config("config", over), tmp_path / "run", resume=True)
    for a, b in zip(_metrics(tmp_path / "ref"), _metrics(tmp_path / "run"), strict=True):
        _assert_same_record(a, b, f"epoch {a['epoch']}")
    for key in ACC_KEYS + tuple(f"val_{k}" for k in ACC_KEYS):
        assert got[key] == want[key], key
    assert got["selection"] == want["selection"]
    for name in ("last.pt", "best.pt"):
        a, b = _state(tmp_path / "ref" / name), _state(tmp_path / "run" / name)
        for k, v in a["model"].items():
            assert torch.equal(b["model"][k], v), (name, k)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["from_epoch"] for r in saved["resumed"]] == [1]


def test_aids_ablation_writes_its_tables(tmp_path, capsys):
    from experiments.aids_ablation import main

    records = main(["--quick", "--epochs", "1", "--eps", "0.1", "--methods", "mtl_ibp",
                    "--rows", "none", "all", "--out", str(tmp_path), "data.limit_train=64",
                    "data.limit_test=16"])
    assert [(r["row"], r["seed"]) for r in records] == [("none", 0), ("all", 0)]
    table = (tmp_path / "table.md").read_text()
    assert "| mtl_ibp | 0.1 | all |" in table and "| mtl_ibp | 0.1 | none |" in table
    assert (tmp_path / "runs.csv").read_text().count("\n") == 3
    again = main(["--quick", "--epochs", "1", "--eps", "0.1", "--methods", "mtl_ibp",
                  "--rows", "none", "--out", str(tmp_path)])  # read back, not rerun
    assert again[0]["clean_acc"] == records[0]["clean_acc"]
