"""TAPS / STAPS (fastcert.methods.taps): the split point on every model family, the gradient
connector and gradient scaling against hand-computed values, and the TAPS bound between the
PGD loss and the IBP loss on the same batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcert.attacks import PGDConfig, pgd_attack
from fastcert.config import ConfigError, build_option
from fastcert.methods.taps import _GradientLink, _GradScale, head_start

from conftest import MODEL_NAMES, FullSizeOps, build_model, count_forwards, tiny_kwargs
from test_methods import _batch, _net


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_head_is_the_last_hidden_block_and_the_output_layer(name):
    """The default (head_blocks=None) exists in every model family: the head holds exactly one
    ReLU block (the hidden FC layer) and ends with the output Linear; in a network with a
    single hidden block (two_layer) the head is the output layer alone."""
    model = build_model(name, (3, 8, 8), 10, **tiny_kwargs(name))
    head = model[head_start(model, None):]
    relus = [m for m in head.modules() if isinstance(m, nn.ReLU)]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert isinstance(head[-1], nn.Linear)
    if sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1:
        assert relus == [] and len(linears) == 1
        assert head_start(model, None) == head_start(model, 0)
    else:
        assert len(relus) == 1 and len(linears) == 2  # hidden FC + output
        assert head_start(model, None) == head_start(model, 1)


def test_cnn7_split_points_match_ctbench_block_sizes():
    """CTBench's 21-layer CNN-7 (with a Normalization layer): 17 4 / 13 8 / 10 11 / 4 17
    ↔ head_blocks 1 / 2 / 3 / 5; fastcert's CNN-7 has no Normalization layer (and keeps
    Flatten in the head)."""
    model = build_model("cnn7", (3, 32, 32), 10, width=0.125)
    assert len(model) == 20
    kinds = {b: [type(m).__name__ for m in model[head_start(model, b):]] for b in (1, 2, 3, 5)}
    assert kinds[1] == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert kinds[2][:3] == ["Conv2d", "BatchNorm2d", "ReLU"] and len(kinds[2]) == 8
    assert len(kinds[3]) == 11 and len(kinds[5]) == 17


def test_too_many_head_blocks_are_refused_naming_the_key():
    method = build_option("method", "taps", {"head_blocks": 2})
    with pytest.raises(ValueError, match=r"method.head_blocks=2: .* 2 ReLU blocks; choose 0..1"):
        method.step(_net(), _batch(0.1))


def test_gradient_link_hand_computed():
    """Box [0, 1], c = 0.5: a pivot at 0.9 sends (0.9 - 0.5)/0.5 = 0.8 of its gradient to u,
    one at 0.2 sends (0.5 - 0.2)/0.5 = 0.6 to l; none goes to the pivots."""
    lo = torch.zeros(1, 1, requires_grad=True)
    up = torch.ones(1, 1, requires_grad=True)
    pivots = torch.tensor([[[0.9], [0.2]]])  # (B=1, K-1=2, latent=1)
    out = _GradientLink.apply(pivots, lo, up, 0.5)
    assert torch.equal(out, pivots)
    (out * torch.tensor([[[1.0], [2.0]]])).sum().backward()
    torch.testing.assert_close(up.grad, torch.tensor([[0.8]]))
    torch.testing.assert_close(lo.grad, torch.tensor([[2 * 0.6]]))


def _link_formula(pivots, lower, upper, c, grad):
    """The connector's gradients as written in the class docstring, term by term."""
    lo, up = lower.unsqueeze(1), upper.unsqueeze(1)
    reach = (c * (up - lo)).clamp_min(_GradientLink.TOL)
    near_up, near_lo = up - c * (up - lo), lo + c * (up - lo)
    half = _GradientLink.TOL / 2
    to_up = (pivots >= near_up).float() * (pivots - near_up).clamp_min(half) / reach
    to_lo = (pivots <= near_lo).float() * (near_lo - pivots).clamp_min(half) / reach
    return (grad * to_lo).sum(1), (grad * to_up).sum(1)


@pytest.mark.parametrize("c", [0.5, 1.0])
def test_gradient_link_matches_its_formula_at_the_box_edges(c):
    """Random pivots, pivots clamped to l and u and pivots exactly at u - c·w and l + c·w
    (on the thresholds, where the factor is tol/2/(c·w); at c = 1 the clamped pivots lie on
    or within an ulp of them), and a flat coordinate (w = 0): the gradients equal the
    docstring's formula, computed in five passes over the pivots per bound (the sum over
    pivots reads them once more)."""
    g = torch.Generator().manual_seed(0)
    lower = torch.randn(3, 40, generator=g)
    upper = lower + torch.rand(3, 40, generator=g)
    upper[:, 0] = lower[:, 0]
    w = (upper - lower).unsqueeze(1)
    pivots = lower.unsqueeze(1) + w * torch.rand(3, 9, 40, generator=g)
    pivots[:, 0], pivots[:, 1] = lower, upper
    pivots[:, 2], pivots[:, 3] = upper - c * (upper - lower), lower + c * (upper - lower)
    grad = torch.randn(3, 9, 40, generator=g)
    lo, up = lower.clone().requires_grad_(), upper.clone().requires_grad_()
    out = _GradientLink.apply(pivots, lo, up, c)
    with FullSizeOps(pivots.numel()) as backward:  # five passes over the pivots per bound
        out.backward(grad)
    assert len(backward.ops) <= 10, backward.ops
    want_lo, want_up = _link_formula(pivots, lower, upper, c, grad)
    torch.testing.assert_close(lo.grad, want_lo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.grad, want_up, rtol=1e-5, atol=1e-6)
    if c == 1.0:  # the thresholds are l and u (to an ulp): every coordinate reaches both
        assert (up.grad != 0).all() and (lo.grad != 0).all()


def test_grad_scale_is_identity_forward_and_scales_the_gradient():
    x = torch.tensor(3.0, requires_grad=True)
    y = _GradScale.apply(x * x, 5.0)
    assert y.item() == 9.0
    y.backward()
    assert x.grad.item() == 5.0 * 6.0


def _taps(**kw):
    opts = {"warmup": {"lambda0": 0.0},
            "latent_attack": {"steps": 20, "restarts": 3, "step_size": 0.4, "loss": "margin"}}
    return build_option("method", "taps", {**opts, **kw})


def test_taps_bound_lies_between_the_pgd_loss_and_the_ibp_loss():
    """On the same batch: CE at a strong input PGD point ≤ L_TAPS ≤ L_IBP (IBP of the head
    over the latent box is sound, so each pivot estimate is ≤ IBP's bound)."""
    net = _net().eval()
    torch.manual_seed(0)
    batch = _batch(0.1)
    out = _taps().step(net, batch)
    _, x_adv = pgd_attack(net.model, batch.x, batch.y, batch.lower, batch.upper,
                          PGDConfig(steps=50, restarts=3, step_size=0.1, loss="ce"))
    pgd = F.cross_entropy(net.model(x_adv), batch.y)
    assert pgd <= out.stats["loss/taps"] <= out.stats["loss/ibp"]
    ibp = build_option("method", "ibp").step(net, batch)
    torch.testing.assert_close(out.stats["loss/ibp"], ibp.loss)  # head IBP ∘ feature IBP = IBP
    assert torch.equal(out.verified, ibp.verified)


def test_loss_is_the_product_and_the_taps_gradient_is_scaled():
    """L_rob = L_TAPS·L_IBP in value; the gradient of the TAPS factor is multiplied by w."""
    grads = {}
    for w in (1.0, 3.0):
        net = _net()
        torch.manual_seed(0)
        out = _taps(grad_scale=w).step(net, _batch(0.1))
        torch.testing.assert_close(out.loss, out.stats["loss/taps"] * out.stats["loss/ibp"])
        out.loss.backward()
        grads[w] = net.model[-1].weight.grad.clone()
    # d/dθ = w·L_IBP·∇L_TAPS + L_TAPS·∇L_IBP: linear in w
    net = _net()
    torch.manual_seed(0)
    out = _taps(grad_scale=0.0).step(net, _batch(0.1))
    out.loss.backward()
    g0 = net.model[-1].weight.grad
    torch.testing.assert_close(grads[3.0] - g0, 3 * (grads[1.0] - g0), rtol=1e-4, atol=1e-6)


def test_the_pivot_search_makes_steps_plus_one_head_passes():
    """The latent search evaluates its random start and every iterate, not the box centre
    (as Mao et al.'s ``_get_pivotal_points_one_batch``): ``steps`` + 1 passes of the head
    per restart, and one more for the estimate at the pivots."""
    net = _net()
    net.split(head_start(net.model, None))  # tracing the split views runs the head too
    calls = count_forwards(net.model[-1])
    for steps, restarts in ((10, 1), (3, 2)):
        calls[0] = 0
        attack = {"steps": steps, "restarts": restarts, "step_size": 0.4, "loss": "margin"}
        _taps(latent_attack=attack).step(net, _batch(0.1))
        assert calls[0] == restarts * (steps + 1) + 1


def test_ramp_trains_ibp_then_taps():
    """While ε < ε_target TAPS is IBP (with the warmup regularisers); STAPS is SABR."""
    ramp = _batch(0.05, eps_target=0.1)
    for name, ref in (("taps", "fast"), ("staps", None)):
        out = build_option("method", name).step(_net(), ramp)
        assert "loss/taps" not in out.stats
        if ref:
            expect = build_option("method", ref).step(_net(), ramp)
            assert torch.equal(out.loss, expect.loss)
    out = build_option("method", "taps", {"ibp_during_ramp": False}).step(_net(), ramp)
    assert "loss/taps" in out.stats


def test_staps_propagates_the_small_box():
    """STAPS's IBP term is IBP's on SABR's small box: below TAPS's on the ε-box, and no
    certificate is reported."""
    opts = {"warmup": {"lambda0": 0.0}, "lam": 0.3}
    torch.manual_seed(0)
    staps = build_option("method", "staps", opts).step(_net(), _batch(0.1))
    taps = _taps().step(_net(), _batch(0.1))
    assert staps.stats["loss/ibp"] < taps.stats["loss/ibp"]
    assert staps.verified is None


@pytest.mark.parametrize("key,value", [("soft_threshold", 0.0), ("grad_scale", -1.0),
                                       ("head_blocks", -1)])
def test_out_of_range_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        build_option("method", "taps", {key: value})
