"""auto_LiRPA bounds as fastcert uses them: hand-checked IBP, soundness under sampling and PGD,
the margin specification, loss fusion, and the one-network-state guarantee."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcert.attacks import PGDConfig, margin_loss, pgd_attack
from fastcert.bounds import Bound, BoundedNet, Mix, beta_mix, margin_spec, robust_ce_from_margins

METHODS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.3)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 10))


@pytest.mark.parametrize("arch", [_mlp, _cnn], ids=["mlp_bn", "cnn_bn"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_contain_sampled_and_attacked_outputs(arch, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = arch()
    _randomize_bn(model, gen)
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).eval()
    x = torch.rand(6, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    eps = 0.05
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    xb = net.perturbed(x, lower, upper)
    tol = 1e-5
    # points: uniform samples, box corners, and PGD iterates of each margin direction
    samples = [lower + torch.rand((64,) + x.shape, generator=gen) * (upper - lower),
               torch.where(torch.rand((64,) + x.shape, generator=gen) < 0.5, lower, upper)]
    with torch.no_grad():
        outs = torch.cat([model(s.flatten(0, 1)).view(-1, *x.shape[:1], 10) for s in samples])
    _, adv = pgd_attack(model, x, y, lower, upper, PGDConfig(steps=20, restarts=2), generator=gen)
    assert ((adv >= lower - 1e-7) & (adv <= upper + 1e-7)).all()
    with torch.no_grad():
        adv_out = model(adv)
    C = margin_spec(y, 10)
    for name, method in METHODS.items():
        lb, ub = net.bounded.compute_bounds(x=(xb,), method=method)
        assert (outs >= lb - tol).all() and (outs <= ub + tol).all(), name
        assert (adv_out >= lb - tol).all() and (adv_out <= ub + tol).all(), name
        mlb, _ = net.bounded.compute_bounds(x=(xb,), method=method, C=C, bound_upper=False)
        adv_margins = torch.einsum("bkc,bc->bk", C, adv_out)
        assert (adv_margins >= mlb - tol).all(), name


def test_ibp_matches_hand_interval_arithmetic():
    """IBP through Linear-ReLU-Linear equals Eq. 3 of Shi et al. 2021 computed by hand."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    x = torch.tensor([[0.2, -0.5, 0.9], [1.0, 0.0, -1.0]])
    lower, upper = x - 0.1, x + 0.1
    net = BoundedNet(model, torch.zeros(2, 3), 2).eval()
    lb, ub = net.bounded.compute_bounds(x=(net.perturbed(x, lower, upper),), method="IBP")

    def affine(W, b, lo, hi):
        Wp, Wn = W.clamp(min=0), W.clamp(max=0)
        return lo @ Wp.T + hi @ Wn.T + b, hi @ Wp.T + lo @ Wn.T + b

    with torch.no_grad():
        h_lo, h_hi = affine(lin1.weight, lin1.bias, lower, upper)
        z_lo, z_hi = h_lo.clamp(min=0), h_hi.clamp(min=0)
        o_lo, o_hi = affine(lin2.weight, lin2.bias, z_lo, z_hi)
    torch.testing.assert_close(lb, o_lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(ub, o_hi, rtol=0, atol=1e-6)
    # the ReLU input bounds the regularisers read are the hand-computed h bounds
    (relu,) = net.relu_bounds()
    torch.testing.assert_close(relu.lower, h_lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(relu.upper, h_hi, rtol=0, atol=1e-6)


def test_margin_spec_rows_are_true_minus_other():
    y = torch.tensor([2, 0])
    C = margin_spec(y, 4)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 1.0, 0.0, 4.0]])
    margins = torch.einsum("bkc,bc->bk", C, logits)
    assert margins.tolist() == [[5.0, 4.0, 3.0], [2.0, 3.0, -1.0]]


def test_robust_ce_equals_ce_at_zero_radius():
    """With ε=0 the margin bounds are exact and the robust CE is the natural CE (Eq. 9)."""
    torch.manual_seed(0)
    model = _mlp().eval()
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).eval()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    logits, lb = net.margin_bounds(x, y, x, x, Bound.IBP)
    torch.testing.assert_close(robust_ce_from_margins(lb, "none"),
                               F.cross_entropy(logits, y, reduction="none"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_loss_fusion_bound_is_above_the_natural_loss(training):
    """The fused CROWN-IBP/IBP upper bound of CE is >= the natural CE on every example, and
    >= the CE at PGD-attacked points inside the box."""
    torch.manual_seed(0)
    model = _cnn()
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).train(training)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    lower, upper = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
    for beta in (0.0, 0.5, 1.0):
        natural, robust, logits = net.fused_ce(x, y, lower, upper, Mix(beta))
        assert (robust >= natural - 1e-5).all(), beta
        torch.testing.assert_close(natural, F.cross_entropy(logits, y, reduction="none"),
                                   atol=1e-4, rtol=0)
    net.eval()
    natural, robust, _ = net.fused_ce(x, y, lower, upper, Mix(0.5))
    _, adv = pgd_attack(model, x, y, lower, upper, PGDConfig(steps=10))
    with torch.no_grad():
        adv_ce = F.cross_entropy(model(adv), y, reduction="none")
    assert (robust >= adv_ce - 1e-5).all()


def test_views_share_batchnorm_statistics():
    """Training through the BoundedModule or the loss-fusion module moves the BN statistics of
    the plain model (one network state: with copies, clean accuracy measured through the plain
    model could fall below the verified accuracy)."""
    torch.manual_seed(0)
    model = _cnn()
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).train()
    x, y = torch.rand(8, 1, 8, 8) + 2.0, torch.randint(0, 10, (8,))
    before = model[1].running_mean.clone()
    net.margin_bounds(x, y, x - 0.01, x + 0.01, Bound.IBP)
    after_margin = model[1].running_mean.clone()
    assert not torch.allclose(before, after_margin)
    net.fused_ce(x, y, x - 0.01, x + 0.01, Mix(0.0))
    assert not torch.allclose(after_margin, model[1].running_mean)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))


def test_pgd_margin_loss_sign():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert margin_loss(logits, y).tolist() == [-1.0, 3.0]


def test_bound_choice_is_typed_and_parsed_from_config_names():
    assert [b.key for b in Bound] == ["ibp", "crown_ibp", "crown", "alpha_crown"]
    assert Bound.parse("crown_ibp") is Bound.CROWN_IBP and Bound.parse(Bound.CROWN) is Bound.CROWN
    with pytest.raises(ValueError, match="unknown verifier 'foo'.*crown_ibp"):
        Bound.parse("foo")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_mix_is_the_convex_combination_of_crown_ibp_and_ibp(beta):
    """Mix(β) = β·CROWN-IBP + (1-β)·IBP on the margins (Eq. 9 of Zhang et al. 2020), computed
    by the one mixing function for both the margin and the loss-fusion paths."""
    torch.manual_seed(1)
    net = BoundedNet(_cnn(), torch.zeros(2, 1, 8, 8), 10).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    lower, upper = (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1)
    with torch.no_grad():
        _, ibp = net.margin_bounds(x, y, lower, upper, Bound.IBP)
        _, cibp = net.margin_bounds(x, y, lower, upper, Bound.CROWN_IBP)
        _, mixed = net.margin_bounds(x, y, lower, upper, Mix(beta))
        _, fused_ibp, _ = net.fused_ce(x, y, lower, upper, Bound.IBP)
        _, fused_cibp, _ = net.fused_ce(x, y, lower, upper, Bound.CROWN_IBP)
        _, fused_mixed, _ = net.fused_ce(x, y, lower, upper, Mix(beta))
    torch.testing.assert_close(mixed, beta_mix(cibp, ibp, beta), rtol=0, atol=1e-5)
    # loss fusion mixes the bounds of s = Σ exp(f_j - f_y) before the log
    torch.testing.assert_close(fused_mixed.exp(),
                               beta_mix(fused_cibp.exp(), fused_ibp.exp(), beta), rtol=1e-4,
                               atol=1e-6)
