"""The method plug-in interface (fastcert.methods): every conf/method option builds its class,
unknown keys are refused with the valid ones, and the shared behaviour of the IBP family
(natural phase through the plain module, plot-only values only where they are used)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, BoundedNet, robust_ce_from_margins
from fastcert.config import ConfigError, build_option, options
from fastcert.methods import Batch, Method, Warmup

from conftest import MODEL_NAMES, build_model, pixel_box, tiny_kwargs
from conftest import bn_mlp as _net
from conftest import random_batch as _batch

METHODS = options("method")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_option_builds_its_class_and_takes_a_step(name):
    method = build_option("method", name)
    assert isinstance(method, Method)
    out = method.step(_net(), _batch(0.05))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (8, 10) and not out.logits.requires_grad
    out.loss.backward()


def test_unknown_method_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"method.warmup.lamda0 is not a key of method.warmup: "
                                          r"did you mean method.warmup.lambda0\? valid keys: "
                                          r".*relu.*tightness"):
        build_option("method", "fast", {"warmup": {"lamda0": 0.1}})
    with pytest.raises(ConfigError, match=r"method.lambda0 is not a key of method: .*warmup"):
        build_option("method", "sabr", {"lambda0": 0.1})


WARMUP_METHODS = ["fast", "sabr", "taps", "staps", "mtl_ibp", "cc_ibp", "exp_ibp"]


@pytest.mark.parametrize("name", WARMUP_METHODS)
def test_every_warmup_method_refuses_a_non_positive_min_eps_reg(name):
    """The ε = 0 box of the warmup regularisers needs a positive radius: every method that holds
    them refuses 0 as fast IBP does."""
    with pytest.raises(ConfigError, match=r"^method.warmup: min_eps_reg=0.0: must be > 0"):
        build_option("method", name, {"warmup": {"min_eps_reg": 0}})
    assert build_option("method", name).warmup == Warmup()  # the file's values are the defaults


@pytest.mark.parametrize("name", ["ibp", "crown_ibp"])
def test_eps0_phase_trains_naturally_through_the_plain_module(name):
    """At ε = 0 vanilla IBP and CROWN-IBP are natural training, run through the nn.Module (not
    the BoundedModule, which would cost a traced forward for nothing)."""
    net = _net()

    def refuse(*args, **kwargs):
        raise AssertionError("the BoundedModule ran in the natural phase")

    net.bounded.forward = refuse
    out = build_option("method", name).step(net, _batch(0.0))
    b = _batch(0.0)
    torch.testing.assert_close(out.loss, F.cross_entropy(net.model(b.x), b.y))


def test_vanilla_ibp_computes_no_regulariser_unless_diagnosing():
    """Vanilla IBP's loss is the robust CE alone; L_tightness / L_relu are computed, without
    gradient, only on diagnostic steps (for the plots)."""
    method = build_option("method", "ibp")
    net = _net()
    out = method.step(net, _batch(0.05))
    assert out.diagnostics == {} and out.relus is None
    b = _batch(0.05)
    net.eval()
    with torch.no_grad():
        _, lb = net.margin_bounds(b.x, b.y, b.lower, b.upper, Bound.IBP)
    diag = method.step(net, _batch(0.05, diagnostics=True))
    torch.testing.assert_close(diag.loss, robust_ce_from_margins(lb))
    assert set(diag.diagnostics) == {"reg/tightness", "reg/relu"} and diag.relus
    assert not any(v.requires_grad for v in diag.diagnostics.values())


def test_fast_optimises_the_regularisers_only_while_lambda_is_positive():
    """Eq. 10 of Shi et al. 2021: L = L_rob + λ(L_tightness + L_relu) with λ = λ0(1 - ε/ε_t);
    after the warmup (λ = 0) the regularisers are not computed on ordinary steps."""
    method = build_option("method", "fast", {"warmup": {"lambda0": 0.5}})
    net = _net().eval()
    ramp = method.step(net, _batch(0.05, eps_target=0.1))
    assert ramp.stats["lambda"] == pytest.approx(0.25)
    b = _batch(0.05)
    with torch.no_grad():
        _, lb = net.margin_bounds(b.x, b.y, b.lower, b.upper, Bound.IBP)
    robust = robust_ce_from_margins(lb)
    assert ramp.loss.item() > robust.item()           # the regularisers add to the loss
    done = method.step(net, _batch(0.1, eps_target=0.1))
    assert done.stats["lambda"] == 0.0 and done.diagnostics == {} and done.relus is None
    b = _batch(0.1)
    with torch.no_grad():
        _, lb = net.margin_bounds(b.x, b.y, b.lower, b.upper, Bound.IBP)
    torch.testing.assert_close(done.loss, robust_ce_from_margins(lb))


@functools.cache
def _family_net(model_name: str) -> BoundedNet:
    torch.manual_seed(0)
    model = build_model(model_name, (3, 8, 8), 10, **tiny_kwargs(model_name))
    return BoundedNet(model, torch.zeros(2, 3, 8, 8), 10)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_with_its_default_config_on_every_model_family(name, model_name):
    """At the target ε (past the ramp: TAPS/STAPS run their latent PGD, SABR its small box),
    on a diagnostic step: a finite loss whose gradient reaches every parameter."""
    net = _family_net(model_name).train()
    net.model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)

    out = build_option("method", name).step(net, Batch(x, y, *pixel_box(x, 0.03), 0.03, 0.03,
                                                       pixel_box, True))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in net.model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
