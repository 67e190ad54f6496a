"""Propagation tightness (fastcert.tightness, Mao et al. ICLR 2024): a hand-computed value,
the autograd Jacobian against an explicit matrix product, τ ≤ 1 on every model family, a
naturally trained network far less tight than an IBP-trained one on the digits, and the
per-epoch record (metrics.jsonl, W&B, plot, certify) without side effects."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcert.bounds import BoundedNet, margin_spec
from fastcert.pipeline import run
from fastcert.tightness import (
    TightnessProbe,
    dln_box_radii,
    dln_tightness,
    propagation_tightness,
    two_layer_invariant,
)

from conftest import MODEL_NAMES, TINY, build_model, compose_config, tiny_kwargs


def test_hand_computed_two_unit_network():
    """h = relu(W1 x + b), W1 = (1, 2)ᵀ, both units active at x = 0.1; logits (h1 - h2, 0),
    label 1: margin h2 - h1 has Jacobian 2 - 1 = 1, while IBP propagates |C W2| |W1| = 1 + 2
    = 3 per unit of radius: τ = 1/3."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        model[0].bias.fill_(0.5)
        model[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        model[2].bias.zero_()
    x = torch.tensor([[0.1]])
    tau = propagation_tightness(model, x, torch.tensor([1]), x - 0.05, x + 0.05, 2)
    torch.testing.assert_close(tau, torch.tensor([[1 / 3]]))
    model[0].bias.data.copy_(torch.tensor([0.5, -1.0]))  # unit 2 dead at x: J = -1, IBP 1
    tau = propagation_tightness(model, x, torch.tensor([1]), x - 0.05, x + 0.05, 2)
    torch.testing.assert_close(tau, torch.tensor([[1.0]]))


def test_autograd_jacobian_agrees_with_the_explicit_matrix_product():
    """τ on a BatchNorm MLP (eval mode) equals |C W3 D2 B2 W2 D1 B1 W1| r / |C W3| D2 |B2 W2|
    D1 |B1 W1| r built from the weights, BatchNorm folded into B_i = diag(γ/√(var + eps)),
    D_i the activation pattern at x, r the clipped box's half-width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU(),
                          nn.Linear(9, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 5))
    for bn in (model[2], model[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(6, 1, 3, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    lower, upper = (x - 0.2).clamp(0, 1), (x + 0.2).clamp(0, 1)
    tau = propagation_tightness(model, x, y, lower, upper, 5)

    def fold(lin, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale[:, None] * lin.weight, scale * (lin.bias - bn.running_mean) + bn.bias

    with torch.no_grad():
        a1, c1 = fold(model[1], model[2])
        a2, c2 = fold(model[4], model[5])
        w3 = model[7].weight
        for b in range(6):
            v = x[b].flatten()
            h1 = a1 @ v + c1
            d1 = torch.diag((h1 > 0).float())
            h2 = a2 @ torch.relu(h1) + c2
            d2 = torch.diag((h2 > 0).float())
            C = margin_spec(y[b:b + 1], 5)[0]
            r = ((upper[b] - lower[b]) / 2).flatten()
            optimal = (C @ w3 @ d2 @ a2 @ d1 @ a1).abs() @ r
            layerwise = (C @ w3).abs() @ d2 @ a2.abs() @ d1 @ a1.abs() @ r
            torch.testing.assert_close(tau[b], optimal / layerwise, rtol=1e-5, atol=1e-7)
    assert not model.training


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tau_is_at_most_one_on_every_model_family(name):
    """|J| ≤ |C W_L| D … D |W_1| entrywise, residual branches included, whatever the
    weights: τ ≤ 1 (up to rounding) and > 0, in train and eval mode alike."""
    torch.manual_seed(1)
    model = build_model(name, (3, 8, 8), 10, **tiny_kwargs(name))
    x = torch.rand(5, 3, 8, 8)
    model.train()(x)  # non-trivial running statistics
    for eps in (0.001, 0.03, 0.3):
        tau = propagation_tightness(model, x, torch.arange(5), (x - eps).clamp(0, 1),
                                    (x + eps).clamp(0, 1), 10)
        assert tau.shape == (5, 9) and (tau > 0).all() and (tau <= 1 + 1e-5).all(), (eps, tau.max())
    assert model.training


def test_positive_network_is_propagation_invariant():
    """All weights positive and every unit active: |Π W| = Π |W|, IBP is exact, τ = 1."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.uniform_(0.1, 1.0)
        model[0].bias.fill_(0.1)
        model[2].weight.uniform_(0.1, 1.0)
        model[2].weight[0] = -model[2].weight[0]  # the true class's row: margins all one sign
    x = torch.rand(3, 4)
    tau = propagation_tightness(model, x, torch.zeros(3, dtype=torch.long), x - 0.1, x + 0.1, 3)
    torch.testing.assert_close(tau, torch.ones(3, 2))


def test_probe_leaves_network_gradients_statistics_and_rngs_alone():
    torch.manual_seed(2)
    model = build_model("cnn_small", (1, 8, 8), 10, width=0.5)
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).train()
    x = torch.rand(8, 1, 8, 8)
    probe = TightnessProbe(x, torch.arange(8) % 10, (x - 0.1).clamp(0, 1),
                           (x + 0.1).clamp(0, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rngs = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    out = probe(net)
    assert set(out) == {"tightness"} and 0 < out["tightness"] <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
    assert (np.random.get_state()[1] == rngs[2]).all()
    assert net.training and all(m.training for m in model.modules())


DIGITS = ["device=cpu", "model=cnn_small", "epochs=5", "schedule.start=0", "schedule.length=2",
          "eps=0.1", "eval.verifiers=[ibp]", "eval.pgd.steps=3", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tightness")
    out = {}
    for method in ("natural", "ibp"):
        run(compose_config("config", DIGITS + [f"method={method}"]), root / method)
        out[method] = root / method
    return out


def _tau(run_dir):
    return [json.loads(line)["tightness"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_natural_training_is_far_less_tight_than_ibp_on_the_digits(digits_runs):
    """The talk's finding in miniature (PGD-trained CNN-7: τ ≈ 0.001-0.007, IBP 0.8-0.98):
    after 5 epochs at ε = 0.1 natural training's τ is below a fifth of IBP's, and IBP
    training more than doubles its τ."""
    natural, ibp = _tau(digits_runs["natural"]), _tau(digits_runs["ibp"])
    assert len(natural) == len(ibp) == 5
    assert natural[-1] < ibp[-1] / 5
    assert ibp[-1] > 2 * ibp[0]


def test_tightness_is_plotted_per_run_and_across_runs(digits_runs, tmp_path):
    from fastcert import plots

    path, data = plots.plot_run(digits_runs["ibp"])["tightness"]
    assert path.is_file() and data["tightness"]["value"] == _tau(digits_runs["ibp"])
    written = plots.main([str(d) for d in digits_runs.values()] + ["--out", str(tmp_path)])
    path, data = written["tightness"]
    assert path == tmp_path / "tightness.png" and len(data) == 2


def test_tightness_is_logged_to_wandb_each_epoch(tmp_path, monkeypatch):
    from test_wandb import OfflineRun, offline_runs, wandb_env

    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    run(compose_config("config", TINY + ["logger=wandb", "epochs=2"]), run_dir)
    import wandb
    wandb.teardown()
    rows = OfflineRun(offline_runs(run_dir)[0]).rows("epoch/tightness")
    logged = [row["epoch/tightness"] for row in rows]
    assert logged == pytest.approx(_tau(run_dir)) and len(logged) == 2


def test_certify_reports_the_test_set_tightness(digits_runs, tmp_path):
    from fastcert.certify import certify
    from fastcert.pipeline import build
    from fastcert.settings import validate
    from fastcert.tightness import mean_tightness

    cfg = compose_config("certify", [f"checkpoint={digits_runs['ibp'] / 'last.pt'}",
                         "attack=pgd", "attack.steps=2", "progress=false", "verifiers=[ibp]",
                         "eps=[0.05,0.1]", "device=cpu"])
    summary = certify(cfg, tmp_path)
    built = build(validate(compose_config("config", DIGITS + ["method=ibp"])), torch.device("cpu"))
    built.net.model.load_state_dict(torch.load(digits_runs["ibp"] / "last.pt",
                                               weights_only=False)["model"])
    for r in summary["results"]:
        assert r["tightness"] == pytest.approx(mean_tightness(
            built.net.model, built.data.test, built.data.eps_box, r["eps"], 10), rel=1e-6)
    assert json.loads((tmp_path / "certify.json").read_text())["results"][1]["tightness"] > 0


def test_a_failing_tightness_does_not_cost_the_certification(digits_runs, tmp_path, monkeypatch):
    """τ is a diagnostic: where it cannot be computed (a layer without a radius rule, memory)
    certify still writes its accuracies, with tightness null and the reason under skipped."""
    from fastcert import tightness
    from fastcert.certify import certify

    def no_rule(*args, **kwargs):
        raise TypeError("tightness: no radius rule for AvgPool2d (test)")

    monkeypatch.setattr(tightness, "propagation_tightness", no_rule)
    cfg = compose_config("certify", [f"checkpoint={digits_runs['ibp'] / 'last.pt'}",
                         "attack=pgd", "attack.steps=2", "progress=false",
                         "verifiers=[ibp]", "eps=[0.05]", "device=cpu"])
    summary = certify(cfg, tmp_path)
    saved = json.loads((tmp_path / "certify.json").read_text())
    assert saved["results"][0]["tightness"] is None and saved["results"][0]["clean"] > 0
    assert "AvgPool2d" in saved["skipped"]["tightness"] and summary["skipped"] == saved["skipped"]


# ------------------------------------------- propagation invariance of deep linear networks
# (Mao et al. 2024, Sec. 3; the talk's slides "Propagation Invariance")


def test_dln_radii_are_the_two_matrix_products():
    """Optimal |W3 W2 W1| r and layer-wise |W3| |W2| |W1| r, written out."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64),
          torch.randn(6, 5, generator=g, dtype=torch.float64),
          torch.randn(3, 6, generator=g, dtype=torch.float64)]
    r = torch.rand(4, generator=g, dtype=torch.float64)
    optimal, layerwise = dln_box_radii(ws, r)
    torch.testing.assert_close(optimal, (ws[2] @ ws[1] @ ws[0]).abs() @ r)
    torch.testing.assert_close(layerwise, ws[2].abs() @ ws[1].abs() @ ws[0].abs() @ r)
    assert (optimal <= layerwise + 1e-12).all()


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_nonnegative_dln_is_propagation_invariant(depth):
    """All weights ≥ 0: |W_L…W_1| = |W_L|…|W_1| entrywise, so τ = 1 for every output."""
    g = torch.Generator().manual_seed(depth)
    ws = [torch.rand(7, 7, generator=g, dtype=torch.float64) for _ in range(depth)]
    torch.testing.assert_close(dln_tightness(ws), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("hidden", [2, 3, 8])
def test_the_talks_example_is_not_propagation_invariant(hidden):
    """W2 W1 = [[1, 2], [-3, 4]] has (W2W1)_11 (W2W1)_12 (W2W1)_21 (W2W1)_22 = -24 < 0, so no
    factorisation through any hidden width is propagation invariant: the sign condition fails
    and τ < 1 on some output."""
    target = torch.tensor([[1.0, 2.0], [-3.0, 4.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(hidden)
    for _ in range(20):
        w1 = torch.randn(hidden, 2, generator=g, dtype=torch.float64)
        w2 = target @ torch.linalg.pinv(w1)  # W1 has full column rank: pinv(W1) W1 = I
        torch.testing.assert_close(w2 @ w1, target)
        assert not two_layer_invariant(w1, w2)
        assert dln_tightness([w1, w2]).min() < 1 - 1e-6


def _sign_consistent(g, m, d, n):
    """W2_ik W1_kj = s_i t_j |B_ik| |A_kj|: one sign per (i, j) across k (invariant)."""
    a = torch.randint(0, 4, (d, n), generator=g).double()
    b = torch.randint(0, 4, (m, d), generator=g).double()
    flip_k = torch.randint(0, 2, (d, 1), generator=g).double() * 2 - 1
    s = torch.randint(0, 2, (m, 1), generator=g).double() * 2 - 1
    t = torch.randint(0, 2, (1, n), generator=g).double() * 2 - 1
    return flip_k * a * t, s * b * flip_k.T


def test_two_layer_sign_condition_decides_invariance_on_random_cases():
    """On random small integer DLNs (exact arithmetic in float64), the sign condition holds
    iff τ = 1 on every output; both kinds of case occur."""
    g = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0}
    for case in range(400):
        m, d, n = (int(v) for v in torch.randint(1, 5, (3,), generator=g))
        if case % 2:
            w1, w2 = _sign_consistent(g, m, d, n)
        else:
            w1 = torch.randint(-2, 3, (d, n), generator=g).double()
            w2 = torch.randint(-2, 3, (m, d), generator=g).double()
        invariant = two_layer_invariant(w1, w2)
        tau = dln_tightness([w1, w2], torch.full((n,), 0.5, dtype=torch.float64))
        # an output whose optimal and layer-wise radii are both 0 is exact too (τ = 1)
        assert invariant == bool((tau == 1).all()), (w1, w2, tau)
        seen[invariant] += 1
    assert seen[True] > 100 and seen[False] > 100
