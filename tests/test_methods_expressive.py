"""MTL-IBP, CC-IBP and Exp-IBP (fastcert.methods.expressive): closed-form values on a 1-D
linear model, the α = 1 (IBP) and α = 0 (PGD training) end points on a BatchNorm network,
and the attack's own ε multiplier."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastcert.bounds import BoundedNet
from fastcert.config import ConfigError, build_option
from fastcert.methods import Batch

from test_methods import _batch, _net

W = 2.0


def _linear(w: float = W) -> BoundedNet:
    """f(x) = (w·x, 0) on a scalar input: with label 1 the CE is log(1 + exp(w·x)), increasing
    in x, so PGD's point is the box's upper end and IBP's margin bound is -w·upper."""
    model = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[w], [0.0]]))
        model[0].bias.zero_()
    return BoundedNet(model, torch.zeros(2, 1), 2).train()


def _linear_batch(eps: float = 0.2) -> Batch:
    x = torch.tensor([[0.1], [-0.3], [0.4]])
    y = torch.ones(3, dtype=torch.long)

    def box(center, radius):
        return center - radius, center + radius

    return Batch(x, y, *box(x, eps), eps, eps, box)


def _softplus(t):
    return math.log1p(math.exp(t))


def _expected(name: str, alpha: float, factor: float, eps: float = 0.2) -> float:
    """The closed form of each loss on _linear()/_linear_batch(): the IBP margin bound is
    -w(x+ε), the adversarial margin -w(x+factor·ε)."""
    xs = [0.1, -0.3, 0.4]
    ibp = sum(_softplus(W * (x + eps)) for x in xs) / 3
    adv = sum(_softplus(W * (x + factor * eps)) for x in xs) / 3
    if name == "mtl_ibp":
        return alpha * ibp + (1 - alpha) * adv
    if name == "exp_ibp":
        return ibp ** alpha * adv ** (1 - alpha)
    mixed = alpha + (1 - alpha) * factor  # CC-IBP combines the margins before the CE
    return sum(_softplus(W * (x + mixed * eps)) for x in xs) / 3


@pytest.mark.parametrize("name", ["mtl_ibp", "cc_ibp", "exp_ibp"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_losses_match_their_closed_forms(name, alpha):
    """MTL: α·L_IBP + (1-α)·L_adv; CC: CE of α·m̲ + (1-α)·m(x_adv); Exp: L_IBP^α·L_adv^(1-α),
    with the attack in the box of radius 0.5·ε (attack_eps_factor)."""
    method = build_option("method", name, {"alpha": alpha, "attack_eps_factor": 0.5,
                                           "warmup": {"lambda0": 0.0}})
    out = method.step(_linear(), _linear_batch())
    assert out.loss.item() == pytest.approx(_expected(name, alpha, 0.5), rel=1e-5)


@pytest.mark.parametrize("name", ["mtl_ibp", "cc_ibp", "exp_ibp"])
def test_alpha_one_is_ibp_exactly(name):
    """α = 1: the loss and its gradient are IBP's (the adversarial term has weight 0)."""
    net = _net()
    ibp_net = _net()
    method = build_option("method", name, {"alpha": 1.0, "warmup": {"lambda0": 0.0}})
    out = method.step(net, _batch(0.1))
    ref = build_option("method", "ibp").step(ibp_net, _batch(0.1))
    assert torch.equal(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    for p, q in zip(net.model.parameters(), ibp_net.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mtl_ibp", "cc_ibp", "exp_ibp"])
def test_alpha_zero_is_pgd_training(name):
    """α = 0: PGD adversarial training with the same attack (same clean-batch BatchNorm
    statistics, same random start)."""
    attack = {"steps": 3, "restarts": 2, "step_size": 0.5, "loss": "ce"}
    net = _net()
    pgd_net = _net()
    torch.manual_seed(5)
    out = build_option("method", name, {"alpha": 0.0, "warmup": {"lambda0": 0.0}, "attack": attack}
                       ).step(net, _batch(0.1))
    torch.manual_seed(5)
    ref = build_option("method", "pgd", {"attack": attack}).step(pgd_net, _batch(0.1))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    for p, q in zip(net.model.parameters(), pgd_net.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_cc_ibp_lies_between_the_adversarial_and_the_ibp_loss():
    """m̲ ≤ m(x_adv) per class, so CE(-(α·m̲ + (1-α)·m_adv)) lies between L_adv and L_IBP, and
    by convexity of the CE below MTL-IBP's α·L_IBP + (1-α)·L_adv."""
    net = _net()
    torch.manual_seed(0)
    method = build_option("method", "cc_ibp", {"alpha": 0.4, "warmup": {"lambda0": 0.0}})
    out = method.step(net, _batch(0.1))
    s = out.stats
    assert s["loss/adversarial"] <= s["loss/robust"] <= s["loss/ibp"]
    assert s["loss/robust"] <= 0.4 * s["loss/ibp"] + 0.6 * s["loss/adversarial"]


def test_the_attack_runs_in_the_box_of_its_own_radius():
    """attack_eps_factor scales the attack box, not the IBP box: factor 1 and 0.5 give
    different adversarial losses and the same IBP loss (the closed forms above)."""
    outs = {f: build_option("method", "mtl_ibp",
                            {"alpha": 0.5, "attack_eps_factor": f, "warmup": {"lambda0": 0.0}}
                            ).step(_linear(), _linear_batch())
            for f in (1.0, 0.5)}
    assert outs[1.0].stats["loss/ibp"] == outs[0.5].stats["loss/ibp"]
    for f, out in outs.items():
        assert out.stats["loss/adversarial"].item() == pytest.approx(
            _expected("mtl_ibp", 0.0, f), rel=1e-5)


@pytest.mark.parametrize("key,value", [("alpha", 1.5), ("attack_eps_factor", 0.0)])
def test_out_of_range_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        build_option("method", "mtl_ibp", {key: value})
