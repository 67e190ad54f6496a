"""Soundness suite: no input inside the L∞ box ever leaves auto_LiRPA's bounds.

For every architecture family of ``conf/model/`` (tiny widths), random and briefly
IBP-trained, with BatchNorm in eval mode on non-trivial running statistics (residual blocks
and grouped convolutions included), and for IBP, CROWN-IBP and CROWN:

* every logit f_k(x') of inputs x' drawn uniformly from the box, at its corners, and found by
  PGD lies in [lb_k - tol, ub_k + tol] of ``compute_bounds`` on the logits;
* every margin f_y(x') - f_j(x') is ≥ the certified margin lower bound of
  ``BoundedNet.margin_bounds`` - tol, and an example whose margins are all certified > 0 is
  classified y at every x' (y = the clean prediction, so that small boxes get certified).

tol = 1e-5·max(1, |bound|): float32 rounding of the bound computation grows with its magnitude.
The box is the clipped per-example box [max(x - ε_b, 0), min(x + ε_b, 1)] with several ε_b in
one batch, as training uses it. The fast version is small; ``slow`` runs larger shapes, every
BN mode and more samples.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcert.attacks import PGDConfig, pgd_attack
from fastcert.bounds import Bound, BoundedNet, margin_spec, robust_ce_from_margins

from conftest import MODEL_NAMES, tiny_kwargs
from conftest import build_model as create_model

#: the verifiers checked here (α-CROWN optimises under autograd: tests/test_compat.py)
VERIFIERS = (Bound.IBP, Bound.CROWN_IBP, Bound.CROWN)

NUM_CLASSES = 10
RTOL = 1e-5


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN: running mean/var and affine parameters away from 0/1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.empty(n).uniform_(0.3, 2.0, generator=g))
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))


def _synthetic(shape, n, g):
    """Inputs in [0, 1] whose class shifts the mean of a fixed pattern: learnable in steps."""
    y = torch.arange(n) % NUM_CLASSES
    patterns = torch.rand(NUM_CLASSES, *shape, generator=g)
    x = (0.5 * patterns[y] + 0.5 * torch.rand(n, *shape, generator=g)).clamp(0, 1)
    return x, y


def make_net(name: str, shape, bn: str, trained: bool, seed: int = 0, steps: int = 4):
    """A tiny model of family ``name`` and its BoundedNet, in eval mode.

    random: PyTorch init plus randomised BN statistics and affine parameters.
    trained: ``steps`` Adam steps of IBP training (robust CE at ε=0.05 + natural CE) through
    the BoundedNet in training mode, which also moves the BN running statistics.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(name, shape, NUM_CLASSES, bn=bn, **tiny_kwargs(name))
    _randomize_bn(model, g)
    net = BoundedNet(model, torch.rand(2, *shape, generator=g), NUM_CLASSES)
    if trained:
        x, y = _synthetic(shape, 32, g)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        net.train()
        for _ in range(steps):
            lo, up = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
            logits, lb = net.margin_bounds(x, y, lo, up, Bound.IBP)
            loss = nn.functional.cross_entropy(logits, y) + robust_ce_from_margins(lb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _corners(lower, upper, n, g):
    bits = torch.rand(n, *lower.shape, generator=g) < 0.5
    return torch.where(bits, upper.unsqueeze(0), lower.unsqueeze(0))


def _uniform(lower, upper, n, g):
    u = torch.rand(n, *lower.shape, generator=g)
    return lower.unsqueeze(0) + u * (upper - lower).unsqueeze(0)


def check_soundness(net: BoundedNet, x, lower, upper, n_samples: int, pgd_steps: int,
                    attack_all_labels: bool, seed: int = 0) -> dict:
    """Assert every sampled/attacked x' lies within every verifier's bounds; returns counts.

    Margins are taken w.r.t. the clean prediction y = argmax f(x) (so that small boxes are
    certified and the "certified ⇒ same class at every x'" check bites); PGD attacks y, and
    with ``attack_all_labels`` also pushes every class down in turn.
    """
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    with torch.no_grad():
        y = net.model(x).argmax(1)
    # points: (S, B, ...) -- uniform, corners, the clean input, PGD results
    pts = [_uniform(lower, upper, n_samples, g), _corners(lower, upper, n_samples, g), x[None]]
    targets = range(NUM_CLASSES) if attack_all_labels else [None]
    for t in targets:
        yt = y if t is None else torch.full_like(y, t)
        _, adv = pgd_attack(net.model, x, yt, lower, upper, PGDConfig(steps=pgd_steps),
                            generator=g)
        pts.append(adv[None])
    pts = torch.cat(pts)
    S = pts.shape[0]
    assert bool((pts >= lower).all() and (pts <= upper).all()), "a sample left the box"
    with torch.no_grad():
        f = net.model(pts.reshape(S * B, *x.shape[1:])).reshape(S, B, NUM_CLASSES)
        f_bounded = net(pts.reshape(S * B, *x.shape[1:])).reshape(S, B, NUM_CLASSES)
    torch.testing.assert_close(f_bounded, f, rtol=1e-5, atol=1e-5)  # one network state
    C = margin_spec(y, NUM_CLASSES)                                    # (B, K-1, K)
    margins = torch.einsum("bjk,sbk->sbj", C, f)                       # (S, B, K-1)
    certified = 0
    for method in VERIFIERS:
        with torch.no_grad():
            lb, ub = net.bounded.compute_bounds(x=(BoundedNet.perturbed(x, lower, upper),),
                                                method=method.value)
            _, mlb = net.margin_bounds(x, y, lower, upper, method)
        assert bool(torch.isfinite(lb).all() and torch.isfinite(ub).all()), method
        tol_l = RTOL * lb.abs().clamp_min(1.0)
        tol_u = RTOL * ub.abs().clamp_min(1.0)
        below = (f < lb - tol_l).nonzero()
        above = (f > ub + tol_u).nonzero()
        assert len(below) == 0, (f"{method}: logit below its lower bound at (sample, example, "
                                 f"class) {below[0].tolist()}: {f[tuple(below[0])].item()} < "
                                 f"{lb[tuple(below[0, 1:])].item()}")
        assert len(above) == 0, (f"{method}: logit above its upper bound at "
                                 f"{above[0].tolist()}: {f[tuple(above[0])].item()} > "
                                 f"{ub[tuple(above[0, 1:])].item()}")
        broken = (margins < mlb - RTOL * mlb.abs().clamp_min(1.0)).nonzero()
        assert len(broken) == 0, (f"{method}: margin below its certified lower bound at "
                                  f"{broken[0].tolist()}")
        cert = (mlb > 0).all(1)
        if cert.any():
            assert bool((f[:, cert].argmax(-1) == y[cert]).all()), (
                f"{method}: a certified example is misclassified inside its box")
        certified += int(cert.sum())
    return {"points": S * B, "certified": certified}  # certified: (example, verifier) pairs


def _inputs(shape, eps_list, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = _synthetic(shape, len(eps_list), g)
    eps = torch.tensor(eps_list).view(-1, *([1] * len(shape)))
    return x, y, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


FAST_SHAPE = (3, 8, 8)
FAST_EPS = [0.002, 0.01, 0.05, 0.2]


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bounds_contain_sampled_and_attacked_outputs(name, trained):
    net = make_net(name, FAST_SHAPE, "full", trained)
    x, _, lower, upper = _inputs(FAST_SHAPE, FAST_EPS)
    counts = check_soundness(net, x, lower, upper, n_samples=16, pgd_steps=5,
                             attack_all_labels=False)
    assert counts["certified"] > 0  # the certified-margin check was exercised


def test_soundness_check_catches_an_unsound_bound(monkeypatch):
    """The check itself bites: bounds shrunk to the middle 2% of their interval are caught."""
    net = make_net("cnn_small", FAST_SHAPE, "full", trained=False)
    x, _, lower, upper = _inputs(FAST_SHAPE, [0.05, 0.1])
    real = net.bounded.compute_bounds

    def shrunk(*args, **kwargs):
        lb, ub = real(*args, **kwargs)
        if lb is None or ub is None:  # margin bounds (lower only): raise them by 1.0
            return (lb + 1.0 if lb is not None else None), ub
        w = ub - lb
        return lb + 0.49 * w, ub - 0.49 * w

    monkeypatch.setattr(net.bounded, "compute_bounds", shrunk)
    with pytest.raises(AssertionError, match="bound"):
        check_soundness(net, x, lower, upper, n_samples=32, pgd_steps=5,
                        attack_all_labels=False)


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["full", "conv", "none"])
@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bounds_sound_large(name, trained, bn):
    shape = (3, 16, 16)
    net = make_net(name, shape, bn, trained, seed=3, steps=10)
    x, _, lower, upper = _inputs(shape, [0.0005, 0.002, 0.01, 0.05, 0.1, 0.3], seed=4)
    counts = check_soundness(net, x, lower, upper, n_samples=64, pgd_steps=20,
                             attack_all_labels=True, seed=5)
    assert counts["certified"] > 0


# ---- a violation is recorded, then the run fails ------------------------------------------


def test_tie_within_tolerance_is_not_a_violation():
    """judge(): certified m̲ > 0 and an attack margin below it by at most the tolerance
    (1e-5 · max(1, max_k |f_k|): two forward passes of one input) is a tie, counted as not
    verified; by more, a violation."""
    from fastcert.evaluate import judge, tie_tolerance

    logits = torch.tensor([[3.0, -1.0], [3.0, -1.0], [3.0, -1.0], [3.0, -1.0]])
    tol = tie_tolerance(logits)
    assert tol.tolist() == pytest.approx([3e-5] * 4)
    lb = torch.tensor([1e-6, 0.5, 0.5, float("nan")])
    margin = torch.tensor([-1e-6, -0.5, 0.7, -1.0])     # what the attack saw
    robust = margin > 0
    verified, tie, violation = judge(lb, margin, robust, tol)
    assert verified.tolist() == [False, False, True, False]
    assert tie.tolist() == [True, False, False, False]
    assert violation.tolist() == [False, True, False, False]


@pytest.mark.parametrize("shift", [1000.0, 0.0], ids=["unsound", "sound"])
def test_a_violation_is_recorded_before_the_run_fails(compose, tmp_path, monkeypatch, shift):
    """A real auto_LiRPA bound shifted up by 1000 at the final evaluation: results.json is
    written with the violations (example, verifier, bound, attack margin) and the run then
    raises SoundnessError; unshifted, the same run has none."""
    import json

    import fastcert.evaluate as ev
    from fastcert.pipeline import run

    from conftest import TINY

    real = ev._margin_lb
    monkeypatch.setattr(ev, "_margin_lb", lambda *a, **k: real(*a, **k) + shift)
    cfg = compose(TINY + ["eval.verifiers=[ibp,crown]"])
    if not shift:
        results = run(cfg, tmp_path)
        assert results["soundness"]["violations"] == []
        return
    with pytest.raises(ev.SoundnessError, match="soundness violation"):
        run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    violations = results["soundness"]["violations"]
    assert violations and {v["verifier"] for v in violations} == {"ibp", "crown"}
    for v in violations:
        assert v["margin_lb"] > 0 and v["attack_margin"] < v["margin_lb"] - v["tolerance"]
        assert 0 <= v["index"] < results["n_test"]
    assert results["clean_acc"] is not None            # the rest of the run is kept


def test_cli_fails_loudly_after_writing_results(tmp_path):
    """The CLI: exit status 3, one clear line, results.json on disk."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY

    sitecustomize = tmp_path / "shift" / "sitecustomize.py"   # shifts the bound in the child
    sitecustomize.parent.mkdir()
    sitecustomize.write_text(
        "import fastcert.evaluate as ev\n"
        "_real = ev._margin_lb\n"
        "ev._margin_lb = lambda *a, **k: _real(*a, **k) + 1000.0\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fastcert.run", *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"{sitecustomize.parent}{os.pathsep}{ROOT}"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: SoundnessError" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((run_dir / "results.json").read_text())["soundness"]["violations"]
    assert "SOUNDNESS VIOLATIONS" in proc.stdout
