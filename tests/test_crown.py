"""CROWN training (fastcert.methods.crown) and the relaxation regularisers of Zhu et al. 2020 on
CROWN and CROWN-IBP training: configured from conf/method, off by default, added to the
method's own loss with their scheduled weights."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, Mix, robust_ce_from_margins
from fastcert.config import ConfigError, build_option
from fastcert.methods import Batch
from fastcert.relaxation import indicators, relaxed_margins

from conftest import TINY, random_batch
from conftest import bn_mlp as _net


def _batch(eps: float = 0.05, eps_target: float = 0.1, n: int = 8) -> Batch:
    return random_batch(eps, eps_target, n=n)


def _r_d(net, batch, bound, relu, r_form="literal"):
    module = net.relaxed(relu)
    _, C, lin = relaxed_margins(module, batch.x, batch.y, batch.lower, batch.upper, 10, bound)
    ind = indicators(module, lin, C, batch.lower, batch.upper, relu, r_form)
    return ind.d.sum(1).mean(), ind.r.sum(1).mean()


def test_regularisers_are_off_by_default():
    for name in ("crown", "crown_ibp"):
        method = build_option("method", name)
        assert (method.lambda_start, method.lambda_end, method.gamma_start,
                method.gamma_end) == (0, 0, 0, 0)
        out = method.step(_net(), _batch())
        assert "reg/d" not in out.stats and "reg/r" not in out.stats


@pytest.mark.parametrize("loss_fusion", [False, True])
@pytest.mark.parametrize("r_form", ["literal", "generalised"])
def test_crown_ibp_adds_lambda_d_plus_gamma_r_to_its_own_loss(loss_fusion, r_form):
    """L = L_CROWN-IBP + λ Σ_t d_t + γ Σ_t r_t (Eq. 10 of Zhu et al.), d and r measured on the
    CROWN-IBP bound (adaptive relaxation); the loss without them is the unregularised one."""
    batch = _batch()
    keys = {"loss_fusion": loss_fusion, "kappa": {"start": 0.5, "end": 0.5}}
    plain = build_option("method", "crown_ibp", keys).step(_net(), batch)
    reg = build_option("method", "crown_ibp", {**keys, "lambda_start": 0.3, "lambda_end": 0.3,
                                               "gamma_start": 2.0, "gamma_end": 2.0,
                                               "r_form": r_form}).step(_net(), batch)
    d, r = _r_d(_net(), batch, Bound.CROWN_IBP, "adaptive", r_form)
    torch.testing.assert_close(reg.loss, plain.loss + 0.3 * d + 2.0 * r)
    torch.testing.assert_close(reg.stats["reg/d"], d.detach())
    torch.testing.assert_close(reg.stats["reg/r"], r.detach())
    torch.testing.assert_close(reg.stats["loss/robust"], plain.stats["loss/robust"])
    if not loss_fusion:
        assert torch.equal(reg.verified, plain.verified)
    reg.loss.backward()


def test_crown_ibp_regularised_robust_loss_is_the_beta_mix():
    """Without loss fusion the regularised step reuses its CROWN-IBP pass for the loss: the
    robust CE of β·CROWN-IBP + (1-β)·IBP, as the unregularised step computes it."""
    batch = _batch(eps=0.025)  # ratio 1/4: β = 0.75
    method = build_option("method", "crown_ibp", {"loss_fusion": False, "gamma_start": 1.0})
    out = method.step(_net(), batch)
    net = _net()
    _, lb = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Mix(0.75))
    torch.testing.assert_close(out.stats["loss/robust"], robust_ce_from_margins(lb).detach())
    assert out.stats["beta"] == pytest.approx(0.75)


def test_weights_follow_their_schedule_over_the_ramp():
    """Start → end linearly in ε/ε_target: γ phased out (CROWN-IBP, Tables 2-3 of Zhu et al.) is
    0 once ε reaches its target, and then nothing is computed; λ warmed up from 0 (Table 1)."""
    method = build_option("method", "crown_ibp", {"gamma_start": 1.0, "gamma_end": 0.0,
                                                  "lambda_start": 0.0, "lambda_end": 0.2})
    assert method.weights(_batch(eps=0.025)) == pytest.approx((0.05, 0.75))
    out = method.step(_net(), _batch(eps=0.1))
    assert method.weights(_batch(eps=0.1)) == pytest.approx((0.2, 0.0))
    assert out.stats["lambda_d"] == pytest.approx(0.2) and out.stats["gamma_r"] == 0.0
    off = build_option("method", "crown_ibp", {"gamma_start": 1.0})
    assert "reg/r" not in off.step(_net(), _batch(eps=0.1)).stats


def test_negative_weights_are_refused_naming_the_keys():
    with pytest.raises(ConfigError, match="gamma_start"):
        build_option("method", "crown", {"gamma_start": -1})
    with pytest.raises(ConfigError, match="r_form"):
        build_option("method", "crown_ibp", {"r_form": "eq9"})


@pytest.mark.parametrize("relaxation", ["same-slope", "adaptive"])
def test_crown_trains_on_the_crown_bound_of_its_relaxation(relaxation):
    """L = κ CE + (1-κ) CE(-m̲_CROWN) with the chosen ReLU relaxation (same-slope: Zhu et al.'s
    Table 1 setting), plus λ d + γ r measured on that same bound."""
    batch = _batch()
    keys = {"relaxation": relaxation, "kappa": {"start": 0.2, "end": 0.2}}
    plain = build_option("method", "crown", keys).step(_net(), batch)
    net = _net()
    module = net.relaxed(relaxation)
    logits, C, lin = relaxed_margins(module, batch.x, batch.y, batch.lower, batch.upper, 10,
                                     Bound.CROWN)
    expected = 0.2 * F.cross_entropy(logits, batch.y) + 0.8 * robust_ce_from_margins(lin.lower)
    torch.testing.assert_close(plain.loss, expected)
    assert torch.equal(plain.verified, (lin.lower > 0).all(1))
    reg = build_option("method", "crown", {**keys, "gamma_start": 0.5, "gamma_end": 0.5}
                       ).step(_net(), batch)
    _, r = _r_d(_net(), batch, Bound.CROWN, relaxation)
    torch.testing.assert_close(reg.loss, plain.loss + 0.5 * r)


def test_same_slope_and_adaptive_crown_differ():
    batch = _batch()
    losses = {rel: build_option("method", "crown", {"relaxation": rel}).step(_net(), batch).loss
              for rel in ("same-slope", "adaptive")}
    assert not torch.isclose(losses["same-slope"], losses["adaptive"])


def test_minimising_r_lowers_r():
    """The gradient of r points the right way: a few steps on γ·r alone shrink it."""
    net = _net(3)
    batch = _batch(eps=0.1)
    opt = torch.optim.Adam(net.model.parameters(), lr=1e-2)
    values = []
    for _ in range(25):
        _, r = _r_d(net, batch, Bound.CROWN_IBP, "adaptive")
        values.append(r.item())
        opt.zero_grad()
        r.backward()
        opt.step()
    assert values[-1] < 0.5 * values[0]


@pytest.mark.parametrize("method", ["crown", "crown_ibp"])
def test_a_regularised_run_goes_through_the_pipeline(compose, tmp_path, method):
    from fastcert.pipeline import run

    cfg = compose(TINY + [f"method={method}", "method.gamma_start=0.5", "method.lambda_end=0.01",
                          "model.widths=[16,16]", "eval.verifiers=[ibp,crown]"])
    results = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ramp = [r for r in records if r["phase"] == "ramp" or r["eps"] > 0]
    assert ramp and all("reg/r" in r and r["reg/d"] >= -1e-4 for r in ramp)
    assert results["crown_verified_acc"] <= results["clean_acc"]
