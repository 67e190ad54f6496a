"""The warmup regularisers against values computed by hand (Eqs. 7-8 of Shi et al. 2021)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcert.bounds import Bound, BoundedNet, ReluBounds
from fastcert.config import build_option
from fastcert.methods import Batch
from fastcert.regularizers import layer_sums, relu_loss, relu_states, tightness_loss

from conftest import FullSizeOps, random_batch


def _rb(lo, hi):
    return ReluBounds("h", torch.tensor(lo, dtype=torch.float32),
                      torch.tensor(hi, dtype=torch.float32))


def test_tightness_by_hand():
    # Δ0 mean 0.2; layer widths: [0.2, 0.2] (mean 0.2) and [1.0, 3.0] (mean 2.0); τ = 0.5
    width0 = torch.full((2, 3), 0.2)
    layers = [_rb([[0.0, 1.0]], [[0.2, 1.2]]), _rb([[-1.0, -1.0]], [[0.0, 2.0]])]
    # terms: ReLU(0.5 - 0.2/0.2) = 0, ReLU(0.5 - 0.2/2.0) = 0.4 ; sum / (τ m) = 0.4 / 1.0
    assert tightness_loss(width0, layer_sums(layers), 0.5).item() == pytest.approx(0.4)


def test_tightness_of_an_empty_box_is_the_formula_not_zero():
    """As the released code: Δ0 = 0 gives ReLU(τ - 0)/τ = 1 per layer (a constant), not 0; the
    fast method's ε = 0 phase avoids it with a tiny box (below)."""
    layers = [_rb([[0.0, 1.0]], [[0.2, 1.2]]), _rb([[-1.0, -1.0]], [[0.0, 2.0]])]
    assert tightness_loss(torch.zeros(2, 3), layer_sums(layers), 0.5).item() == 1.0
    assert tightness_loss(torch.zeros(2, 3), layer_sums([_rb([[0.0]], [[0.0]])]), 0.5).item() == 1.0


def test_relu_balance_by_hand():
    # centres c = [2, 1, -1, -3, 0]; active (lower > 0): c=2, 1 ; inactive (upper < 0): -1, -3
    lo = [[1.5, 0.5, -1.5, -3.5, -1.0]]
    hi = [[2.5, 1.5, -0.5, -2.5, 1.0]]
    c = torch.tensor([2.0, 1.0, -1.0, -3.0, 0.0])
    alpha = (2 + 1) / (1 + 3)                                   # 0.75
    dev = (c - c.mean()) ** 2                                    # mean c = -0.2
    beta = (dev[0] + dev[1]) / (dev[2] + dev[3])
    tau = 0.9
    expected = (max(0.0, tau - min(alpha, 1 / alpha))
                + max(0.0, tau - min(beta.item(), 1 / beta.item()))) / (tau * 1)
    assert relu_loss(layer_sums([_rb(lo, hi)]), tau).item() == pytest.approx(expected, rel=1e-5)
    # a layer with no inactive neuron contributes nothing, but counts in m
    only_active = _rb([[1.0, 2.0]], [[2.0, 3.0]])
    both = relu_loss(layer_sums([_rb(lo, hi), only_active]), tau)
    assert both.item() == pytest.approx(expected / 2, rel=1e-5)


def _formula_terms(input_width, relus, tau):
    """Eqs. 7-8 as written, through autograd (the reference of the fused sums)."""
    tight, relu = [], []
    for r in relus:
        tight.append(torch.relu(tau - input_width.mean() / (r.upper - r.lower).mean()))
        c = ((r.lower + r.upper) / 2).flatten()
        active, inactive = (r.lower.flatten() > 0), (r.upper.flatten() < 0)
        dev = (c - c.mean()) ** 2
        alpha = c[active].sum() / -c[inactive].sum()
        beta = dev[active].sum() / dev[inactive].sum()
        relu.append(sum(torch.relu(tau - torch.minimum(q, 1 / q)) for q in (alpha, beta)))
    m = tau * len(relus)
    return torch.stack(tight).sum() / m, torch.stack(relu).sum() / m


def test_fused_sums_give_the_formulas_values_and_gradients():
    """L_tightness and L_relu from :func:`layer_sums` (one autograd function, gradient in
    closed form) against Eqs. 7-8 written out and differentiated by autograd, in float64
    (and torch's numerical gradient check of the function itself)."""
    from fastcert.regularizers import _Sums

    torch.manual_seed(0)
    lowers = [torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)]
    relus = [ReluBounds("h", lo.requires_grad_(), (lo.detach() + torch.rand_like(lo))
                        .requires_grad_()) for lo in lowers]
    width = torch.rand(4, 2, dtype=torch.float64)
    leaves = [t for r in relus for t in (r.lower, r.upper)]
    sums = layer_sums(relus)
    got = (tightness_loss(width, sums, 0.5), relu_loss(sums, 0.9))
    want = (_formula_terms(width, relus, 0.5)[0], _formula_terms(width, relus, 0.9)[1])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
        for a, b in zip(torch.autograd.grad(g, leaves, retain_graph=True),
                        torch.autograd.grad(w, leaves, retain_graph=True),
                        strict=True):
            torch.testing.assert_close(a, b)
    lo = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    up = (lo.detach() + torch.rand_like(lo)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _Sums.apply(a, b)[0], (lo, up))


def test_regularisers_pass_over_the_bounds_a_few_times():
    """The bounds are a step's largest tensors: the forward makes 5 passes over a layer's
    bounds that write a tensor of its size (the centres, their squares and the two masks,
    written as floats by the comparisons) and the backward 8, plus autograd's two
    accumulations (autograd through the formulas as written made 8 with two bool-to-float
    conversions, and 18)."""
    torch.manual_seed(0)
    lower = torch.randn(8, 4, 6, 6, requires_grad=True)
    upper = (lower.detach() + torch.rand_like(lower)).requires_grad_()
    width = torch.rand(8, 3)
    with FullSizeOps(lower.numel()) as forward:
        sums = layer_sums([ReluBounds("h", lower, upper)])
        loss = tightness_loss(width, sums, 0.5) + relu_loss(sums, 0.5)
    assert len(forward.ops) <= 5 and "_to_copy" not in forward.ops, forward.ops
    with FullSizeOps(lower.numel()) as backward:
        loss.backward()
    assert len(backward.ops) <= 10, backward.ops


def test_relu_states_fractions():
    states = relu_states([_rb([[1.0, -2.0, -1.0, 0.0]], [[2.0, -1.0, 1.0, 0.5]])])
    assert states == {"active": [0.5], "inactive": [0.25], "unstable": [0.25]}


def test_regularisers_on_a_tiny_net_with_known_bounds():
    """Through auto_LiRPA: one hidden layer with weights chosen so the IBP bounds are known."""
    lin1 = nn.Linear(2, 3)
    lin2 = nn.Linear(3, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
        lin1.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
    net = BoundedNet(nn.Sequential(lin1, nn.ReLU(), lin2), torch.zeros(2, 2), 2).eval()
    x = torch.tensor([[1.0, 1.0]])
    lower, upper = x - 0.1, x + 0.1
    net.margin_bounds(x, torch.tensor([0]), lower, upper, Bound.IBP)
    (h,) = net.relu_bounds()
    # h = [x1, 2 x2, -x1-x2]: bounds [0.9,1.1], [1.8,2.2], [-2.2,-1.8]; widths 0.2, 0.4, 0.4
    torch.testing.assert_close(h.lower, torch.tensor([[0.9, 1.8, -2.2]]))
    torch.testing.assert_close(h.upper, torch.tensor([[1.1, 2.2, -1.8]]))
    # L_tight: Δ0 = 0.2, Ê(Δ1) = 1/3 -> ReLU(0.9 - 0.6) / 0.9
    tight = tightness_loss(upper - lower, layer_sums([h]), 0.9)
    assert tight.item() == pytest.approx(0.3 / 0.9, rel=1e-5)
    # L_relu: c = [1, 2, -2]; alpha = 3/2 ; dev from mean 1/3: [4/9, 25/9, 49/9] -> beta = 29/49
    a, b = 1.5, 29 / 49
    expected = (max(0, 0.9 - min(a, 1 / a)) + max(0, 0.9 - min(b, 1 / b))) / 0.9
    assert relu_loss(layer_sums([h]), 0.9).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------ the fast method's ε = 0 phase


def _bn_net(seed: int = 0) -> BoundedNet:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    build_option("init", "ibp")(model, seed=seed)
    return BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).train()


def _batch(eps: float, eps_target: float = 0.2) -> Batch:
    return random_batch(eps, eps_target, n=16)


def test_fast_eps0_step_regularises_on_the_tiny_box_with_the_clean_ce():
    """ε = 0 in the released code: bounds on the 1e-6 box (``--min-eps-reg``), loss = clean CE
    + λ0 (L_tightness + L_relu); L_tightness is a real, differentiable term there."""
    fast = build_option("method", "fast")
    assert fast.warmup.min_eps_reg == 1e-6
    net = _bn_net()
    batch = _batch(0.0)
    out = fast.step(net, batch)

    reference = _bn_net()  # same weights: recompute by hand on the 1e-6 box
    lower, upper = batch.box(batch.x, 1e-6)
    logits, _ = reference.margin_bounds(batch.x, batch.y, lower, upper, Bound.IBP)
    sums = layer_sums(reference.relu_bounds())
    tight = tightness_loss(upper - lower, sums, fast.warmup.tau)
    relu = relu_loss(sums, fast.warmup.tau)
    expected = F.cross_entropy(logits, batch.y) + fast.warmup.lambda0 * (tight + relu)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.stats["lambda"] == fast.warmup.lambda0 and out.verified is None
    assert 0 < tight.item() < 1   # a real term, not the forced 0 nor the empty-box constant
    # its gradient reaches the weights
    tight.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in reference.model.parameters())


def test_tightness_at_the_tiny_box_is_that_of_small_eps():
    """IBP widths scale linearly in ε for small ε, so Ê(Δ0)/Ê(Δi) and L_tightness at 1e-6 are
    those of any small radius: the ε = 0 phase trains the same quantity."""
    values = []
    for eps in (1e-6, 1e-4):
        net = _bn_net()
        batch = _batch(eps)
        net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)
        values.append(tightness_loss(batch.upper - batch.lower, layer_sums(net.relu_bounds()),
                                     0.5).item())
    assert values[0] == pytest.approx(values[1], rel=1e-3)
