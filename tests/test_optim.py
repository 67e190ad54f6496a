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


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam)])
def test_adamw_and_radam_options(compose, name, cls):
    optim = instantiate(compose([f"optim={name}"]).optim, "optim")
    opt, _ = optim.build([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, cls)
    assert opt.defaults["weight_decay"] == (0.01 if name == "adamw" else 0.0)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_options_run_torchs_fused_update(compose, name, cls):
    """Adam and AdamW are torch's fused implementations (one kernel per parameter; on a CPU
    a quarter of the default's step time, in ``make bench``): the same update as torch's
    default implementation, to float rounding, over a few steps with weight decay."""
    optim = instantiate(compose([f"optim={name}", "optim.weight_decay=0.01"]).optim, "optim")
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt, _ = optim.build(ours)
    ref_opt = cls(ref, lr=optim.lr, weight_decay=0.01)
    assert opt.defaults["fused"] is True and isinstance(opt, cls)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, o in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
