"""The optimiser options: ``optim=sgd`` composes and builds torch's SGD with its momentum, the
step-wise LR decay and the checks every optimiser shares."""
from __future__ import annotations

import pytest
import torch

from fastcert.config import ConfigError, instantiate
from fastcert.optim import SGD


def test_sgd_option_builds_momentum_sgd_with_its_decay(compose):
    cfg = compose(["optim=sgd", "optim.momentum=0.5", "optim.milestones=[1]"])
    optim = instantiate(cfg.optim, "optim")
    assert isinstance(optim, SGD) and cfg.optim.name == "sgd"
    opt, sched = optim.build([torch.nn.Parameter(torch.ones(2))])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.5, 0.0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.2)


def test_sgd_keys_are_checked(compose):
    with pytest.raises(ConfigError, match="optim.momentum='fast': expected a number"):
        instantiate(compose(["optim=sgd", "optim.momentum=fast"]).optim, "optim")
    with pytest.raises(ConfigError, match="learning rate must be > 0"):
        instantiate(compose(["optim=sgd", "optim.lr=0"]).optim, "optim")


@pytest.mark.parametrize("preset", ["wang2022/digits_2v5/ibp", "wang2022/mnist_2v5/natural"])
def test_the_sgd_presets_select_the_option(compose, preset):
    optim = compose([f"experiment={preset}"]).optim
    assert (optim.name, optim._target_, optim.momentum) == ("sgd", "fastcert.optim.SGD", 0.0)


def test_l1_gradient_is_that_of_the_penalty_on_linear_and_conv_weights():
    """optim.l1 = w adds w·sign(W) to the gradients of the Linear/Conv weights: the gradient of
    w·Σ|W| (CTRAIN's L1 regulariser), biases and BatchNorm untouched."""
    from fastcert.optim import Adam

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
    x = torch.randn(4, 1, 8, 8)
    opt = Adam(lr=1e-3, l1=1e-3)
    weights = opt.l1_weights(model)
    assert [w.shape for w in weights] == [model[0].weight.shape, model[3].weight.shape]
    model(x).square().mean().backward()
    opt.add_l1_gradient(weights)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    penalty = 1e-3 * sum(w.abs().sum() for w in (model[0].weight, model[3].weight))
    (model(x).square().mean() + penalty).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)
    assert Adam(lr=1e-3).l1_weights(model) == []
    with pytest.raises(ValueError, match="optim.l1"):
        Adam(l1=-1.0)


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam)])
def test_adamw_and_radam_options(compose, name, cls):
    optim = instantiate(compose([f"optim={name}"]).optim, "optim")
    opt, _ = optim.build([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, cls)
    assert opt.defaults["weight_decay"] == (0.01 if name == "adamw" else 0.0)
