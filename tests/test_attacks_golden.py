"""The attacks' results are pinned: golden values of PGD (cross entropy, margin, restarts, a
clean start, the clean-batch BatchNorm mode) and of the strong attack on a small BatchNorm CNN
with fixed parameters and seeds, stored in tests/golden/attacks.json, and the forward passes an
attack makes are counted.

Bit for bit where the kernels are the stored ones: a refactoring of the attacks (fewer forward
passes, another BatchNorm mechanism) must not move a single bit of the attack point or the
margins. The clean logits of the model, stored beside them, tell whether this CPU's kernels are
the ones that computed the file: if they reproduce those logits exactly, every value must match
exactly; on other kernels (another x86 ISA) the attack points still match exactly (they move
by signed steps, and a gradient sign does not turn on rounding) and the margins within 1e-5.

Regenerate (after a deliberate change of what an attack computes; review the diff):

    FASTCERT_REGEN_GOLDEN=1 python -m pytest -n 0 tests/test_attacks_golden.py
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcert.attacks import PGDConfig, StrongAttack
from fastcert.bounds import BoundedNet
from fastcert.config import build_option

from conftest import bn_mlp, count_forwards, random_batch

GOLDEN = Path(__file__).resolve().parent / "golden" / "attacks.json"
REGEN = os.environ.get("FASTCERT_REGEN_GOLDEN") == "1"
BATCH, SHAPE, CLASSES, EPS = 6, (1, 8, 8), 5, 0.02

#: name -> (attack, BatchNorm mode: "eval" = running statistics, "clean" = the clean batch's)
CASES = {
    "pgd_ce": (PGDConfig(steps=5, step_size=0.25, loss="ce"), "eval"),
    "pgd_margin_corner_cosine": (PGDConfig(steps=5, step_size=0.5, loss="margin",
                                           start="corner", schedule="cosine"), "eval"),
    "pgd_margin_restarts": (PGDConfig(steps=4, restarts=3, step_size=0.3, loss="margin"),
                            "eval"),
    "pgd_ce_clean_start": (PGDConfig(steps=4, step_size=0.25, loss="ce", random_start=False),
                           "eval"),
    "pgd_ce_clean_bn": (PGDConfig(steps=5, restarts=2, step_size=0.25, loss="ce"), "clean"),
    "pgd_margin_clean_bn": (PGDConfig(steps=3, step_size=0.4, loss="margin"), "clean"),
    "strong": (StrongAttack(steps=4, targets=2, restarts=2, restart_steps=3), "eval"),
}


def _cnn() -> BoundedNet:
    """conv-BN-ReLU ×2, linear-BN-ReLU, linear (1×8×8 → 5 classes), every parameter and
    BatchNorm buffer drawn from NumPy's seeded generator (the same values on every CPU)."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(96, 12), nn.BatchNorm1d(12), nn.ReLU(),
                          nn.Linear(12, CLASSES))
    rng = np.random.default_rng(3)

    def draw(t, low, high):
        t.copy_(torch.from_numpy(rng.uniform(low, high, tuple(t.shape))).float())

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, (low, high) in zip((m.weight, m.bias, m.running_mean, m.running_var),
                                          ((0.5, 1.5), (-0.1, 0.1), (-0.1, 0.1), (0.5, 1.5))):
                    draw(t, low, high)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(3.0 / math.prod(m.weight.shape[1:]))
                draw(m.weight, -bound, bound)
                draw(m.bias, -0.1, 0.1)
    return BoundedNet(model, torch.zeros(2, *SHAPE), CLASSES)


def _data(mode: str):
    """Images, their labels (the network's predictions in the case's BatchNorm mode, but the
    last image's label is its runner-up: one example misclassified from the start) and the
    ε-boxes."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(0, 1, (BATCH, *SHAPE))).float()
    with torch.no_grad():
        ranked = _cnn().train(mode == "clean").model(x).argsort(1, descending=True)
    y = ranked[:, 0].clone()
    y[-1] = ranked[-1, 1]
    return x, y, (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)


def run_case(name: str) -> dict:
    """The case's attack on the fixed network and data (generator seed 0): its x_adv, margin
    and robust flags, and the clean logits the kernels give (the fingerprint)."""
    attack, mode = CASES[name]
    net = _cnn()
    x, y, lower, upper = _data(mode)
    generator = torch.Generator().manual_seed(0)
    if mode == "eval":
        net.eval()
        with torch.no_grad():
            clean = net.model(x)
        result = attack.run(net.model, x, y, lower, upper, generator)
    else:
        net.train()
        clean = net(x).detach()  # the clean pass through the BoundedModule sets the statistics
        with net.batch_norm_stats(detach=True):
            result = attack.run(net.model, x, y, lower, upper, generator)
    return {"clean_logits": clean, "x_adv": result.x_adv, "margin": result.margin,
            "robust": result.robust}


def _stored() -> dict:
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: FASTCERT_REGEN_GOLDEN=1 pytest {Path(__file__).name}")
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_results_match_the_golden_values(name):
    got = run_case(name)
    if REGEN:
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        stored[name] = {k: v.tolist() for k, v in got.items()}
        text = json.dumps(dict(sorted(stored.items())), indent=1)
        text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m.group().split()), text)
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text + "\n")
        warnings.warn(f"FASTCERT_REGEN_GOLDEN=1: rewrote {name} in {GOLDEN}", stacklevel=1)
        return
    want = {k: torch.tensor(v) for k, v in _stored()[name].items()}
    same_kernels = torch.equal(got["clean_logits"], want["clean_logits"])
    torch.testing.assert_close(got["clean_logits"], want["clean_logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["x_adv"], want["x_adv"]), f"{name}: the attack point moved"
    assert torch.equal(got["robust"], want["robust"])
    if same_kernels:
        assert torch.equal(got["margin"], want["margin"]), f"{name}: {got['margin']} != stored"
    else:
        torch.testing.assert_close(got["margin"], want["margin"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps,restarts", [(1, 1), (5, 1), (3, 2)])
def test_one_attack_makes_steps_plus_one_forward_passes(steps, restarts):
    """A restart evaluates x and its ``steps`` iterates after it: ``steps`` + 1 forward passes
    when the caller passes the clean logits it has or the attack starts at x, one more for the
    clean input otherwise (never the clean pass twice)."""
    net = _cnn().eval()
    x, y, lower, upper = _data("eval")
    calls = count_forwards(net.model)
    with torch.no_grad():
        clean = net.model(x)
    for cfg, clean_logits, want in (
            (PGDConfig(steps=steps, restarts=restarts), clean, restarts * (steps + 1)),
            (PGDConfig(steps=steps, restarts=restarts, random_start=False), None,
             restarts * (steps + 1)),
            (PGDConfig(steps=steps, restarts=restarts), None, restarts * (steps + 1) + 1)):
        calls[0] = 0
        cfg.run(net.model, x, y, lower, upper, torch.Generator().manual_seed(0), clean_logits)
        assert calls[0] == want, (cfg, clean_logits is not None)


class _Centre(nn.Module):
    """Logits (0, -Σ(x - 0.5)²): for label 0 the margin objective -Σ(x - 0.5)² is largest, 0,
    at x = 0.5 itself and negative at every other point."""

    def forward(self, x):
        z = -((x - 0.5) ** 2).flatten(1).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("random_start", [True, False])
def test_without_x_the_candidates_are_the_iterates(random_start):
    """``evaluate_x=False`` (TAPS's latent search from the box centre): x is no candidate and
    no forward pass; the record starts at the first iterate (x itself without a random
    start). Here x is the objective's maximum: counted, it is the point and its margin 0
    makes the example non-robust; not counted, the point is an iterate, with margin > 0."""
    torch.manual_seed(0)
    model = _Centre()
    calls = count_forwards(model)
    x = torch.full((6, 8), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    cfg = PGDConfig(steps=4, restarts=2, step_size=0.3, loss="margin", random_start=random_start)
    counted = cfg.run(model, x, y, x - 0.2, x + 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(counted.x_adv, x) and not counted.robust.any()
    calls[0] = 0
    alone = cfg.run(model, x, y, x - 0.2, x + 0.2, torch.Generator().manual_seed(0),
                    evaluate_x=False)
    assert calls[0] == cfg.restarts * (cfg.steps + 1)
    if random_start:
        assert (alone.x_adv != x).any(1).all() and (alone.margin > 0).all()
        assert alone.robust.all()
    else:  # the first iterate is x: the same record as when x is counted
        assert torch.equal(alone.x_adv, x) and torch.equal(alone.margin, counted.margin)


def test_the_clean_logits_a_caller_passes_give_the_same_result():
    """Given the logits at x it would compute itself, the attack returns the same bits."""
    net = _cnn().eval()
    x, y, lower, upper = _data("eval")
    cfg = PGDConfig(steps=3, restarts=2, loss="ce")
    own = cfg.run(net.model, x, y, lower, upper, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = net.model(x)
    given = cfg.run(net.model, x, y, lower, upper, torch.Generator().manual_seed(0), clean)
    for a, b in zip((own.x_adv, own.margin, own.robust), (given.x_adv, given.margin,
                                                           given.robust)):
        assert torch.equal(a, b)


class _Overshoot(nn.Module):
    """Logits (5·cos(10·Σx), 0): from x = 0.1 (label 0) the signed-gradient step of a box of
    half-width 0.478 lands at 10·Σx ≈ 2π - 0.5, past cos's minimum, where the cross entropy is
    below the clean one: the attack's point is x, not its last iterate."""

    def forward(self, x):
        z = 5 * torch.cos(10 * x.flatten(1).sum(1, keepdim=True))
        return torch.cat([z, torch.zeros_like(z)], 1)


def test_the_final_pass_returns_its_logits_where_the_last_iterate_is_the_attack_point():
    """``final`` evaluates the last iterate in place of the model (the attack's result keeps
    every bit) and its logits come back exactly when x_adv is that iterate: one forward pass
    in all for the last iterate and the attack point."""
    net = _cnn().eval()
    x, y, lower, upper = _data("eval")
    calls = count_forwards(net.model)
    # one step to a vertex: its point; 2 restarts: the first restart's point beats the last
    for cfg, at_last in ((PGDConfig(steps=1, step_size=10.0, loss="ce"), True),
                         (PGDConfig(steps=3, restarts=2, step_size=0.25, loss="margin"), False)):
        plain = cfg.run(net.model, x, y, lower, upper, torch.Generator().manual_seed(0))
        final = []

        def final_pass(z, final=final):
            final.append(net.model(z))
            return final[-1]

        calls[0] = 0
        got = cfg.run(net.model, x, y, lower, upper, torch.Generator().manual_seed(0),
                      final=final_pass)
        assert calls[0] == cfg.restarts * (cfg.steps + 1) + 1 and len(final) == 1
        for a, b in zip((plain.x_adv, plain.margin, plain.robust),
                        (got.x_adv, got.margin, got.robust)):
            assert torch.equal(a, b)
        assert plain.logits is None and (got.logits is not None) == at_last
        if at_last:
            assert got.logits is final[0] and torch.equal(got.logits, net.model(got.x_adv))
    model, x = _Overshoot(), torch.full((1, 1), 0.1)
    y, half = torch.zeros(1, dtype=torch.long), 0.478
    cfg = PGDConfig(steps=1, step_size=1.0, loss="ce", random_start=False)
    got = cfg.run(model, x, y, x - half, x + half, final=model)
    assert torch.equal(got.x_adv, x) and got.logits is None


def test_a_pgd_step_moves_the_iterate_in_place_in_three_passes():
    """Each step is sign(∇) in place, x + move·sign in place and the projection in place
    (the move, step size × half-width, computed once): no min/max pair, no new iterate; the
    record copies x once (its point of largest loss) and no point of smallest margin (PGD
    never returns it); the last iterate reaches ``final`` without requiring a gradient."""
    from conftest import FullSizeOps

    torch.manual_seed(0)
    model = nn.Linear(256, 3)
    x = torch.rand(4, 256)
    y = torch.tensor([0, 1, 2, 0])
    lower, upper = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    seen = []
    cfg = PGDConfig(steps=4, restarts=1, step_size=0.25, loss="ce")
    with FullSizeOps(x.numel()) as ops:
        cfg.run(model, x, y, lower, upper, torch.Generator().manual_seed(0),
                final=lambda z: seen.append(z.requires_grad) or model(z))
    for name in ("sign_", "addcmul_", "clamp_"):
        assert ops.ops.count(name) == cfg.steps, ops.ops
    assert not {"maximum", "minimum", "sign"} & set(ops.ops), ops.ops
    assert ops.ops.count("clone") == 1 and seen == [False], ops.ops


@pytest.mark.parametrize("name", ["mtl_ibp", "cc_ibp", "pgd"])
def test_a_training_step_runs_the_clean_pass_once(name, monkeypatch):
    """MTL/CC-IBP (one attack step) and PGD training: the clean pass through the BoundedModule
    serves the attack's clean evaluation and the pass at the attack's last iterate serves
    the adversarial logits where that iterate is the attack point, so the plain model runs
    only the attack's iterates, restarts·(steps + 1) forward passes, and one more where the
    attack point is another point."""
    method = build_option("method", name)
    net = bn_mlp()
    calls = count_forwards(net.model)
    results = []
    run = PGDConfig.run
    monkeypatch.setattr(PGDConfig, "run", lambda *a, **k: results.append(run(*a, **k))
                        or results[-1])
    method.step(net, random_batch(0.05, n=BATCH))
    (result,) = results
    again = int(result.logits is None)
    assert calls[0] == method.attack.restarts * (method.attack.steps + 1) + again
    if name != "pgd":  # one step of 10× the half-width: the vertex beats x and the start
        assert again == 0
