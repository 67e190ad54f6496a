"""The relaxation indicators d (Eq. 8) and r (Eq. 9) of Zhu et al. 2020 (fastcert.relaxation),
and the auto_LiRPA helpers they read (fastcert.bounds: A matrices, the relaxed view, the real
network's forward pass at the relaxed optimum)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastcert.bounds import Bound, BoundedNet, forward_relu_inputs, linear_margin_bound
from fastcert.relaxation import indicators, measure, relaxed_margins

BOUNDS = (Bound.CROWN, Bound.CROWN_IBP)


def _two_layer(W1, b1, W2, b2) -> BoundedNet:
    model = nn.Sequential(nn.Linear(len(W1[0]), len(W1)), nn.ReLU(), nn.Linear(len(W1), len(W2)))
    with torch.no_grad():
        for layer, w, b in ((model[0], W1, b1), (model[2], W2, b2)):
            layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return BoundedNet(model, torch.zeros(2, len(W1[0])), len(W2)).eval()


def _indicators(net, x, y, lower, upper, bound, relu, r_form="literal"):
    module = net.relaxed(relu)
    _, C, lin = relaxed_margins(module, x, y, lower, upper, net.num_classes, bound)
    return lin, indicators(module, lin, C, lower, upper, relu, r_form)


# Both hand examples: x = (0, 0), ε = 1 (box [-1, 1]², no clipping), y = 0, c = e_0 - e_1.
X0, Y0 = torch.zeros(1, 2), torch.tensor([0])
EXAMPLE_1 = ([[1, 1], [2, -1]], [1, 0], [[2, 0], [0, 1]], [0, 0])
EXAMPLE_2 = ([[1, 1], [0, 2]], [0.5, 0], [[1, 0], [0, 2]], [0, 0])


@pytest.mark.parametrize("bound", BOUNDS)
def test_example_1_by_hand(bound):
    """Example 1. Layer-1 bounds x̲ = (1-2, 0-3) = (-1, -3), x̄ = (3, 3): both neurons unstable
    (the first layer's bounds are exact, so CROWN and CROWN-IBP agree). Same-slope band:
    s = x̄/(x̄-x̲) = (3/4, 1/2), t = -x̄x̲/(x̄-x̲) = (3/4, 3/2). λ = cᵀW2 = (2, -1): neuron 1 on the
    lower line (δ* = 0), neuron 2 on the upper line (δ* = t).

    cᵀ𝒲_{2:1} = (λ⊙s)ᵀW1 = (1.5, -0.5)W1 = (0.5, 2.0) > 0, so δ0* = (-1, -1).
    p_C* = cᵀg_2(x) - ε‖·‖₁ + t_2·λ_2 = (1.5·1 - 0.5·0) - 2.5 - 1.5 = -2.5.
    Real network at (-1, -1): x' = (-1+1-1·1, -2+1) = (-1, -1), ReLU 0, so p'_O = 0 and
    d = 0 - (-2.5) = 2.5; r = (|x'_1| + min(|-1+3|, |-1-3|))/2 = (1 + 2)/2 = 1.5.

    Adaptive CROWN: lower slopes α = (1, 0) (x̄ > -x̲ for neuron 1 only); λ_1 ≥ 0 uses α_1 = 1,
    λ_2 < 0 the upper line: cᵀ𝒲_{2:1} = (2·1, -1·0.5)W1 = (2, -0.5)W1 = (1, 2.5), δ0* = (-1, -1),
    p_C* = (2·1 - 0.5·0) - 3.5 - 1.5 = -3, d = 3, r = 1.5 (both r forms: neuron 1 has α = 1
    and x' = -1 < 0, at distance 1 from [0, x̄])."""
    net = _two_layer(*EXAMPLE_1)
    for relu, p_c, d in (("same-slope", -2.5, 2.5), ("adaptive", -3.0, 3.0)):
        for r_form in ("literal", "generalised"):
            lin, ind = _indicators(net, X0, Y0, X0 - 1, X0 + 1, bound, relu, r_form)
            assert ind.optimum_input.tolist() == [[[-1.0, -1.0]]]
            assert lin.lower.item() == pytest.approx(p_c)
            assert ind.margin_at_optimum.item() == pytest.approx(0.0)
            assert ind.d.item() == pytest.approx(d)
            assert ind.r.item() == pytest.approx(1.5)
            assert ind.unstable.item() == 2
    lin, _ = _indicators(net, X0, Y0, X0 - 1, X0 + 1, bound, "same-slope")
    assert lin.input_coef.flatten().tolist() == pytest.approx([0.5, 2.0])
    assert lin.relu_coef[0].flatten().tolist() == pytest.approx([1.5, -0.5])  # λ⊙s


@pytest.mark.parametrize("bound", BOUNDS)
def test_example_2_by_hand_separates_the_two_r_forms(bound):
    """Example 2. x̲ = (-1.5, -2), x̄ = (2.5, 2); s = (5/8, 1/2), t_2 = 1; λ = (1, -2).

    Same-slope: cᵀ𝒲_{2:1} = (5/8, -1)W1 = (5/8, 5/8 - 2) = (0.625, -1.375), so δ0* = (-1, +1);
    p_C* = 5/8·0.5 - 2 - 2·1 = -3.6875. x' = (-1+1+0.5, 2) = (0.5, 2), p'_O = 0.5 - 4 = -3.5,
    d = 0.1875; r = (|0.5| + min(|2+2|, |2-2|))/2 = 0.25.

    Adaptive: α = (1, 0); cᵀ𝒲_{2:1} = (1, -1)W1 = (1, -1), δ0* = (-1, +1), p_C* = 0.5 - 2 - 2
    = -3.5 = p'_O, so d = 0: the relaxation is exact here. Eq. 9 as printed still charges
    |x'_1| = 0.5 (r = 0.25), while neuron 1's lower line z = x meets the ReLU on [0, x̄] ∋ 0.5:
    the generalised r is 0."""
    net = _two_layer(*EXAMPLE_2)
    cases = (("same-slope", "literal", -3.6875, 0.1875, 0.25),
             ("same-slope", "generalised", -3.6875, 0.1875, 0.25),
             ("adaptive", "literal", -3.5, 0.0, 0.25),
             ("adaptive", "generalised", -3.5, 0.0, 0.0))
    for relu, r_form, p_c, d, r in cases:
        lin, ind = _indicators(net, X0, Y0, X0 - 1, X0 + 1, bound, relu, r_form)
        assert ind.optimum_input.tolist() == [[[-1.0, 1.0]]]
        assert lin.lower.item() == pytest.approx(p_c)
        assert ind.margin_at_optimum.item() == pytest.approx(-3.5)
        assert ind.d.item() == pytest.approx(d, abs=1e-6)
        assert ind.r.item() == pytest.approx(r)


def _eq7_reference(W1, b1, W2, b2, x, y, eps):
    """Eq. 7 and Eqs. 8-9 of Zhu et al. written out for one example of a 2-layer net (the
    same-slope band, exact first-layer bounds, unclipped box): (p_C*, δ0*, d, r) per t ≠ y."""
    pre = W1 @ x + b1
    radius = eps * W1.abs().sum(1)
    lo, up = pre - radius, pre + radius
    unstable = (lo < 0) & (up > 0)
    s = torch.where(unstable, up / (up - lo), (lo >= 0).to(pre.dtype))
    t = torch.where(unstable, -up * lo / (up - lo), torch.zeros_like(pre))
    out = []
    for k in range(W2.shape[0]):
        if k == y:
            continue
        c = torch.zeros(W2.shape[0], dtype=pre.dtype)
        c[y], c[k] = 1, -1
        lam = c @ W2
        coef = (lam * s) @ W1
        p_c = c @ (W2 @ (s * pre) + b2) - eps * coef.abs().sum() + (t * lam.clamp(max=0)).sum()
        delta0 = torch.where(coef >= 0, -eps, eps)
        xp = W1 @ (x + delta0) + b1
        p_o = c @ (W2 @ torch.relu(xp) + b2)
        far = torch.minimum((xp - lo).abs(), (xp - up).abs())
        term = torch.where(lam < 0, far, xp.abs())
        r = (term * unstable).sum() / unstable.sum().clamp(min=1)
        out.append((p_c, delta0, p_o - p_c, r))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_same_slope_crown_is_eq7_and_d_r_follow_eqs_8_9(seed):
    """On random 2-layer nets, auto_LiRPA's same-slope CROWN bound is Eq. 7, and δ0*, d and r
    from its A matrices equal the formulas written out with explicit matrices."""
    g = torch.Generator().manual_seed(seed)
    W1, b1 = torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
    W2, b2 = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    net = _two_layer(W1.tolist(), b1.tolist(), W2.tolist(), b2.tolist())
    x = torch.randn(3, 5, generator=g)
    y = torch.randint(0, 4, (3,), generator=g)
    eps = 0.7
    lin, ind = _indicators(net, x, y, x - eps, x + eps, Bound.CROWN, "same-slope")
    assert ind.unstable.min() > 0
    for i in range(3):
        ref = _eq7_reference(W1, b1, W2, b2, x[i], y[i], eps)
        for t, (p_c, delta0, d, r) in enumerate(ref):
            assert lin.lower[i, t].item() == pytest.approx(p_c.item(), rel=1e-5, abs=1e-5)
            torch.testing.assert_close(ind.optimum_input[i, t] - x[i], delta0)
            assert ind.d[i, t].item() == pytest.approx(d.item(), rel=1e-5, abs=1e-5)
            assert ind.r[i, t].item() == pytest.approx(r.item(), rel=1e-5, abs=1e-5)


def _mlp_bn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _cnn_bn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10))


def _digits_batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("arch", [_mlp_bn, _cnn_bn])
@pytest.mark.parametrize("training", [True, False])
def test_d_is_nonnegative(arch, training):
    """p_C* is a lower bound of the margin at every feasible input, and x + δ0* is feasible, so
    d ≥ 0: for BatchNorm networks in training and eval mode, both relaxations, CROWN and
    CROWN-IBP, clipped boxes of several radii."""
    for seed in range(2):
        net = BoundedNet(arch(seed), torch.zeros(2, 1, 8, 8), 10).train(training)
        x, y = _digits_batch(seed=seed)
        for eps in (0.02, 0.1, 0.3):
            lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
            for relu in ("same-slope", "adaptive"):
                for bound in BOUNDS:
                    lin, ind = _indicators(net, x, y, lower, upper, bound, relu)
                    assert ((ind.optimum_input >= lower[:, None]) &
                            (ind.optimum_input <= upper[:, None])).all()
                    assert ind.d.min().item() >= -1e-4, (seed, eps, relu, bound)
                    assert (ind.r >= 0).all()
                    assert ind.unstable.sum() > 0


def test_no_unstable_neuron_gives_zero_d_and_r():
    """Without unstable neurons the relaxation is the network itself: d = 0, r = 0."""
    # x̲ = (4, -6), x̄ = (6, -4)
    net = _two_layer([[1, 0], [0, 1]], [5, -5], [[1, 2], [3, -1]], [0, 0])
    for relu in ("same-slope", "adaptive"):
        for bound in BOUNDS:
            _, ind = _indicators(net, X0, Y0, X0 - 1, X0 + 1, bound, relu)
            assert ind.unstable.item() == 0
            assert ind.d.item() == pytest.approx(0.0, abs=1e-6) and ind.r.item() == 0.0
    net = BoundedNet(_mlp_bn(0), torch.zeros(2, 1, 8, 8), 10).eval()  # a tiny radius
    x, y = _digits_batch()
    _, ind = _indicators(net, x, y, x - 1e-6, x + 1e-6, Bound.CROWN, "same-slope")
    assert (ind.unstable == 0).all()
    assert ind.d.abs().max().item() < 1e-4 and (ind.r == 0).all()


def test_r_zero_implies_d_zero():
    """Proposition 1 of Zhu et al.: when the real network at x + δ0* hits the relaxed optimum's
    point set at every unstable neuron (r = 0), the relaxation is tight there (d = 0). Random
    small integer nets (same-slope band), many of which have r = 0 with unstable neurons."""
    g = torch.Generator().manual_seed(0)
    net = _two_layer([[1, 0], [0, 1]], [0, 0], [[1, 0], [0, 1]], [0, 0])
    hits = 0
    for _ in range(300):
        with torch.no_grad():
            for p in net.model.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
        x = torch.randint(-1, 2, (1, 2), generator=g).float()
        _, ind = _indicators(net, x, Y0, x - 1, x + 1, Bound.CROWN, "same-slope")
        if ind.unstable.item() > 0 and ind.r.item() == 0:
            hits += 1
            assert ind.d.item() == pytest.approx(0.0, abs=1e-5)
    assert hits >= 10


def test_gradients_reach_the_weights_through_d_and_r():
    net = BoundedNet(_mlp_bn(0), torch.zeros(2, 1, 8, 8), 10).train()
    x, y = _digits_batch()
    _, ind = _indicators(net, x, y, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1),
                         Bound.CROWN_IBP, "adaptive")
    first = net.model[1].weight
    for value in (ind.d.sum(), ind.r.sum()):
        (grad,) = torch.autograd.grad(value, first, retain_graph=True)
        assert grad.abs().sum() > 0


def test_the_bound_with_a_matrices_is_the_bound_of_the_margin_view():
    """Asking auto_LiRPA for the A matrices does not change the bound: the same lower bounds as
    BoundedNet.margin_bounds, for CROWN and CROWN-IBP; IBP has no linear bound to give."""
    net = BoundedNet(_cnn_bn(1), torch.zeros(2, 1, 8, 8), 10).eval()
    x, y = _digits_batch()
    lower, upper = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    for bound in BOUNDS:
        _, C, lin = relaxed_margins(net.bounded, x, y, lower, upper, 10, bound)
        _, lb = net.margin_bounds(x, y, lower, upper, bound)
        torch.testing.assert_close(lin.lower, lb)
        assert lin.input_coef.shape == (12, 9, 1, 8, 8)
        assert [a.shape[:2] for a in lin.relu_coef] == [(12, 9)] * 3
    with pytest.raises(ValueError, match="use crown or crown_ibp"):
        linear_margin_bound(net.bounded, C, Bound.IBP)


def test_forward_at_the_optimum_uses_the_bounds_batchnorm_statistics():
    """In training mode the bounds normalise with the clean batch's statistics; the real network
    at x + δ0* must be that same network: evaluated at two of the clean inputs it returns their
    clean logits (not a BatchNorm of those two), and the running statistics stay untouched."""
    net = BoundedNet(_mlp_bn(0), torch.zeros(2, 1, 8, 8), 10).train()
    x, y = _digits_batch()
    logits, _, _ = relaxed_margins(net.bounded, x, y, (x - 0.1).clamp(0, 1),
                                   (x + 0.1).clamp(0, 1), 10, Bound.CROWN_IBP)
    running = [b.clone() for b in net.model.buffers()]
    at, pres = forward_relu_inputs(net.bounded, x[:2])
    torch.testing.assert_close(at, logits[:2])
    assert len(pres) == 2 and pres[0].shape == (2, 24)
    for before, after in zip(running, net.model.buffers()):
        torch.testing.assert_close(before, after)
    assert net.bounded.relus[0].inputs[0].lower is not None  # the bounds are kept


def test_relaxed_view_shares_the_network_state():
    """The same-slope view is another view of the one network: parameters, BatchNorm buffers and
    train/eval mode follow the model; the adaptive relaxation is the margin view itself."""
    net = BoundedNet(_mlp_bn(0), torch.zeros(2, 1, 8, 8), 10).train()
    assert net.relaxed("adaptive") is net.bounded
    view = net.relaxed("same-slope")
    assert view is net.relaxed("same-slope") and view.training
    x, _ = _digits_batch()
    net.model(x)  # a training step's BN update
    with torch.no_grad():
        net.model[1].weight.mul_(2)
    net.eval()
    assert not net.relaxed("same-slope").training
    torch.testing.assert_close(view(x), net.model(x))
    assert "_relaxed" not in "".join(net.state_dict())


def test_measure_averages_the_indicators_over_a_loader():
    net = BoundedNet(_cnn_bn(0), torch.zeros(2, 1, 8, 8), 10)
    x, y = _digits_batch(n=10)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]

    def box(c, e):
        return (c - e).clamp(0, 1), (c + e).clamp(0, 1)

    out = measure(net, loader, box, 0.1, Bound.CROWN_IBP, "adaptive")
    net.eval()
    lower, upper = box(x, 0.1)
    _, ind = _indicators(net, x, y, lower, upper, Bound.CROWN_IBP, "adaptive")
    assert out["d"] == pytest.approx(ind.d.sum(1).mean().item(), rel=1e-4)
    assert out["r"] == pytest.approx(ind.r.sum(1).mean().item(), rel=1e-4)
    assert out["d"] > 0 and out["r"] > 0
