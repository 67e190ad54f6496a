"""SABR (fastcert.methods.sabr): the small box (hand-computed corners, always inside the
ε-box, λ = 1 the ε-box itself), λ = 1 equals IBP exactly, and the loss is IBP's on the small
box around the attack point."""
from __future__ import annotations

import pytest
import torch

from fastcert.attacks import pgd_attack
from fastcert.bounds import Bound, robust_ce_from_margins
from fastcert.config import ConfigError, build_option
from fastcert.methods.sabr import small_box

from test_methods import _batch, _net


def test_small_box_hand_computed():
    """ε-box [0.2, 0.6], λ = 0.5 → radius 0.1; centres are clamped into [0.3, 0.5]."""
    lower, upper = torch.full((4,), 0.2), torch.full((4,), 0.6)
    center = torch.tensor([0.55, 0.35, 0.1, 0.4])
    lo, up = small_box(lower, upper, center, 0.5)
    torch.testing.assert_close(lo, torch.tensor([0.4, 0.25, 0.2, 0.3]))
    torch.testing.assert_close(up, torch.tensor([0.6, 0.45, 0.4, 0.5]))


@pytest.mark.parametrize("lam", [1e-3, 0.1, 0.4, 0.7, 0.999])
def test_small_box_lies_inside_the_eps_box(lam):
    """Exactly, in floating point, for any centre (inside or outside the box) and boxes
    clipped to the data range; its width is λ times the ε-box's."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 5, 5, generator=g)
    lower, upper = (x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1)
    center = torch.rand(x.shape, generator=g) * 1.6 - 0.3
    lo, up = small_box(lower, upper, center, lam)
    assert (lo >= lower).all() and (up <= upper).all() and (lo <= up).all()
    torch.testing.assert_close(up - lo, lam * (upper - lower), rtol=1e-5, atol=1e-6)
    inside = ((center - lam * (upper - lower) / 2 >= lower)
              & (center + lam * (upper - lower) / 2 <= upper))
    torch.testing.assert_close(((lo + up) / 2)[inside], center[inside])


def test_lambda_one_is_the_eps_box_itself():
    g = torch.Generator().manual_seed(1)
    lower = torch.rand(100, generator=g)
    upper = lower + torch.rand(100, generator=g)
    lo, up = small_box(lower, upper, torch.rand(100, generator=g) * 3, 1.0)
    assert torch.equal(lo, lower) and torch.equal(up, upper)


def test_lambda_one_equals_ibp_exactly():
    """SABR with λ = 1 propagates the ε-box: loss, gradient and verified flags are IBP's
    (both without the regularisers: λ0 = 0 for SABR, vanilla IBP)."""
    net, ref_net = _net(), _net()
    method = build_option("method", "sabr", {"lam": 1.0, "warmup": {"lambda0": 0.0}})
    out = method.step(net, _batch(0.1))
    ref = build_option("method", "ibp").step(ref_net, _batch(0.1))
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.verified, ref.verified)
    out.loss.backward()
    ref.loss.backward()
    for p, q in zip(net.model.parameters(), ref_net.model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_loss_is_ibp_on_the_small_box_around_the_attack_point():
    """CE(-m̲(B), y) for B = small_box(ε-box, x*, λ), x* = PGD (CE) over the ε-box with
    BatchNorm in eval mode; never above IBP's loss on the whole ε-box."""
    attack = {"steps": 4, "restarts": 1, "step_size": 0.5, "loss": "ce", "random_start": False}
    method = build_option("method", "sabr",
                          {"lam": 0.3, "warmup": {"lambda0": 0.0}, "attack": attack})
    batch = _batch(0.1)
    out = method.step(_net(), batch)
    net = _net()
    net.model.eval()  # the attack runs before the step's clean pass, on running statistics
    _, x_adv = pgd_attack(net.model, batch.x, batch.y, batch.lower, batch.upper, method.attack)
    net.train()
    lo, up = small_box(batch.lower, batch.upper, x_adv, 0.3)
    _, lb = net.margin_bounds(batch.x, batch.y, lo, up, Bound.IBP)
    torch.testing.assert_close(out.loss, robust_ce_from_margins(lb))
    ibp = build_option("method", "ibp").step(_net(), batch)
    assert out.loss <= ibp.loss
    assert out.verified is None and "acc/small_box" in out.stats  # no certificate of the ε-box


def test_regularisers_read_the_small_box():
    """The warmup regularisers (λ0 > 0, during the ramp) take Δ0 from the small box, whose
    width is λ times the ε-box's (CTBench computes --fast-reg on SABR's small box)."""
    from fastcert.regularizers import layer_sums, tightness_loss

    method = build_option("method", "sabr", {"lam": 0.5, "warmup": {"lambda0": 0.5}})
    out = method.step(_net(), _batch(0.05, eps_target=0.1, diagnostics=True))
    assert out.stats["lambda"] == pytest.approx(0.25)
    b = _batch(0.05)
    sums = layer_sums(out.relus)
    small = tightness_loss(0.5 * (b.upper - b.lower), sums, 0.5)
    torch.testing.assert_close(out.diagnostics["reg/tightness"], small)
    assert not torch.allclose(small, tightness_loss(b.upper - b.lower, sums, 0.5))


@pytest.mark.parametrize("lam", [0.0, 1.5])
def test_lambda_outside_0_1_is_refused(lam):
    with pytest.raises(ConfigError, match="lam"):
        build_option("method", "sabr", {"lam": lam})
