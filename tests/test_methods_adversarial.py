"""PGD adversarial training and the shared attack step (fastcert.methods.adversarial): the
closed-form loss on a 1-D linear model, and the BatchNorm convention (the clean pass sets the
statistics; attacks and adversarial logits neither use their own nor update running ones)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastcert.config import build_option
from fastcert.methods.adversarial import adversarial_logits

from test_methods import _batch, _net
from test_methods_expressive import W, _linear, _linear_batch


def test_pgd_loss_is_the_ce_at_the_worst_point_of_the_box():
    """f(x) = (w·x, 0), label 1: CE = log(1 + exp(w·x)) is largest at the box's upper end, so
    L = mean log(1 + exp(w(x + ε))); with κ = 0.5 half of it is the clean CE."""
    xs, eps = [0.1, -0.3, 0.4], 0.2
    worst = sum(math.log1p(math.exp(W * (x + eps))) for x in xs) / 3
    clean = sum(math.log1p(math.exp(W * x)) for x in xs) / 3
    out = build_option("method", "pgd").step(_linear(), _linear_batch(eps))
    assert out.loss.item() == pytest.approx(worst, rel=1e-6)
    # only x = -0.3 stays correct at its worst point (w(x + ε) = -0.2 < 0): PGD accuracy 1/3
    assert out.verified is None and out.stats["acc/pgd"].item() == pytest.approx(1 / 3)
    mixed = build_option("method", "pgd", {"kappa": {"start": 0.5, "end": 0.5}})
    assert mixed.step(_linear(), _linear_batch(eps)).loss.item() == pytest.approx(
        0.5 * clean + 0.5 * worst, rel=1e-6)


def _running(net):
    return [b.clone() for n, b in net.model.named_buffers() if "running" in n]


@pytest.mark.parametrize("name", ["pgd", "mtl_ibp", "sabr", "taps", "staps"])
def test_running_statistics_see_the_clean_batch_only(name):
    """One step updates the BatchNorm running statistics exactly as one clean forward pass
    does: attacks, adversarial logits and TAPS's pivots leave them alone."""
    net, ref = _net(), _net()
    batch = _batch(0.1)
    build_option("method", name).step(net, batch)
    ref.model(batch.x)
    for a, b in zip(_running(net), _running(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(m.training for m in net.model.modules())


def test_adversarial_logits_use_the_clean_batch_statistics():
    """After the clean pass, f(x) with the frozen statistics is the clean logits; another
    batch is normalised with the clean batch's statistics, not its own."""
    net = _net()
    batch = _batch(0.1)
    clean = net(batch.x)
    torch.testing.assert_close(adversarial_logits(net, batch.x), clean)
    other = torch.rand_like(batch.x)
    own = _net().model(other)  # training mode: the other batch's own statistics
    assert not torch.allclose(adversarial_logits(net, other), own, atol=1e-3)
    eval_net = _net().eval()
    eval_net.model(batch.x)  # eval: running statistics, the context changes nothing
    torch.testing.assert_close(adversarial_logits(eval_net, other), eval_net.model(other))


def test_pgd_gradient_reaches_the_parameters_through_the_adversarial_point():
    net = _net()
    out = build_option("method", "pgd").step(net, _batch(0.1))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in net.model.parameters())
    assert F.cross_entropy(out.logits, _batch(0.1).y) == out.stats["loss/natural"]


def test_clean_batch_statistics_are_one_fused_pass_with_the_formulas_gradient():
    """With the clean batch's statistics a BatchNorm layer is one pass over its input
    forward and one backward (the per-channel affine map x·s + t; the formula written out
    made four and eight), and at the clean batch itself the logits and every parameter's
    gradient are training-mode BatchNorm's: the gradient flows through the statistics."""
    from conftest import FullSizeOps

    batch = _batch(0.1, n=16)
    weights = torch.randn(16, 10)
    grads = []
    for use_clean_stats in (False, True):
        torch.manual_seed(0)
        net = _net()
        if use_clean_stats:
            net(batch.x)  # the clean pass through the BoundedModule sets the statistics
            with net.batch_norm_stats():
                logits = net.model(batch.x)
        else:
            logits = net.model(batch.x)
        (logits * weights).sum().backward()
        grads.append([p.grad for p in net.model.parameters()])
    for plain, clean in zip(*grads, strict=True):
        torch.testing.assert_close(clean, plain)

    net = _net()
    net(batch.x)
    bn = next(m for m in net.model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    h = torch.randn(256, bn.num_features, requires_grad=True)  # larger than any clean-pass tensor
    upstream = torch.randn(256, bn.num_features)
    for detach in (False, True):
        h.grad = None
        with net.batch_norm_stats(detach=detach):
            with FullSizeOps(h.numel()) as forward:
                out = bn(h)
            with FullSizeOps(h.numel()) as backward:
                out.backward(upstream)
        assert forward.ops == ["native_batch_norm"], forward.ops
        assert len(backward.ops) == 1, backward.ops


def test_clean_batch_statistics_restore_a_layers_own_forward():
    """Within batch_norm_stats each BatchNorm layer normalises with the clean batch's
    statistics; after it the layer's own forward is back, also one set on the instance (a
    data-parallel run's, fastcert.distributed.sync_batchnorm) or by an enclosing block."""
    from fastcert.distributed import sync_batchnorm

    net = _net()
    batch = _batch(0.1)
    clean = net(batch.x)
    sync_batchnorm(net.model)
    bns = [m for m in net.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    own = [bn.__dict__["forward"] for bn in bns]
    with net.batch_norm_stats(detach=True):
        with net.batch_norm_stats():
            torch.testing.assert_close(net.model(batch.x), clean)
        torch.testing.assert_close(net.model(batch.x), clean)
    assert [bn.__dict__["forward"] for bn in bns] == own
    assert all(bn.training for bn in bns)
