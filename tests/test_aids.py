"""CTBench's training aids (fastcert.aids), each against its definition: the L1 penalty by
hand on a tiny net, precise BatchNorm and SWA's BatchNorm update by hand over the batches, ReLU
shrinking on a box, EDAC's pre-step (what it changes and what it leaves), and their config."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcert.aids import EDAC, Aids, add_l1_gradient, l1_norm, relu_shrinking, shrunk_relu_box
from fastcert.aids.batchnorm import example_weighted_statistics, precise_statistics
from fastcert.attacks import PGDConfig
from fastcert.bounds import Bound
from fastcert.config import ConfigError, instantiate

from conftest import bn_mlp, random_batch


def _tiny_net() -> nn.Module:
    """Conv(1→2, 2x2) → BN → ReLU → Flatten → Linear(2·2·2 → 3), with set weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]],
                                          [[[-0.25, 0.0], [3.0, -1.0]]]]))
        net[0].bias.fill_(7.0)
        net[1].weight.fill_(-5.0)
        net[1].bias.fill_(9.0)
        net[4].weight.copy_(torch.arange(24, dtype=torch.float32).view(3, 8) - 12)
        net[4].bias.fill_(-100.0)
    return net


def test_l1_is_the_sum_of_absolute_conv_and_linear_weights():
    """CTBench compute_L1_reg: weights of every Conv2d and Linear (output layer included),
    no bias, no BatchNorm: here |conv| = 3.5 + 4.25 and |linear| = Σ_{k=0..23} |k - 12| = 144."""
    net = _tiny_net()
    assert l1_norm(net).item() == pytest.approx(3.5 + 4.25 + 144.0, abs=0)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    value = add_l1_gradient(net, 0.01)
    assert value.item() == pytest.approx(0.01 * 151.75, rel=1e-6)
    assert torch.equal(net[0].weight.grad, 1 + 0.01 * net[0].weight.sign())
    assert torch.equal(net[4].weight.grad, 1 + 0.01 * net[4].weight.sign())
    assert net[0].weight.grad[0, 0, 1, 1] == 1  # sign(0) = 0, as autograd's |·|'
    for p in (net[0].bias, net[1].weight, net[1].bias, net[4].bias):
        assert torch.equal(p.grad, torch.ones_like(p))
    loss = 0.01 * sum(m.weight.abs().sum() for m in (net[0], net[4]))  # autograd agrees
    grads = torch.autograd.grad(loss, [net[0].weight, net[4].weight])
    assert torch.equal(grads[0] + 1, net[0].weight.grad)
    assert torch.equal(grads[1] + 1, net[4].weight.grad)


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Linear(4, 3), nn.BatchNorm1d(3))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 6, generator=g) * 3 + 1 for n in (8, 8, 8, 3)]  # a short last one


def _bn_inputs(net: nn.Module, batches) -> dict[nn.Module, list[torch.Tensor]]:
    """Every BatchNorm's input per batch in a training-mode forward (batch statistics)."""
    net = copy.deepcopy(net).train()
    seen = {bn: [] for bn in net.modules() if isinstance(bn, nn.BatchNorm1d)}
    hooks = [bn.register_forward_pre_hook(lambda m, i: seen[m].append(i[0].detach()))
             for bn in seen]
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    return list(seen.values())


@pytest.mark.parametrize("weighting", ["batch", "example"])
def test_population_statistics_by_hand(weighting):
    """Precise BN (CTBench reset_bn_to_population_statistics, momentum 1/k): the mean over
    batches of the batch means and unbiased batch variances; SWA's update (bn_update, momentum
    b/(n+b)): the same averages weighted by batch size."""
    net, batches = _bn_net(), _batches()
    inputs = _bn_inputs(net, batches)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm1d):
            bn.running_mean.fill_(123.0)  # discarded by the first batch
    (precise_statistics if weighting == "batch" else example_weighted_statistics)(
        net, iter(batches))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    sizes = torch.tensor([float(len(x)) for x in batches])
    w = torch.ones(len(batches)) if weighting == "batch" else sizes
    w = w / w.sum()
    for bn, xs in zip(bns, inputs, strict=True):
        mean = sum(wk * x.mean(0) for wk, x in zip(w, xs))
        var = sum(wk * x.var(0, unbiased=True) for wk, x in zip(w, xs))
        assert torch.allclose(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1
    assert net.training
    if weighting == "batch":  # differs from the whole set's statistics (the batch means' spread)
        whole = torch.cat(inputs[0])
        assert not torch.allclose(bns[0].running_var, whole.var(0), rtol=1e-3)


def test_relu_shrinking_box_and_that_it_stays_inside_its_context():
    lower = torch.tensor([-1.0, -1.0, 0.5, -2.0, 0.0])
    upper = torch.tensor([2.0, -0.5, 1.5, 0.0, 3.0])
    lo, up = shrunk_relu_box(lower, upper, 0.8)
    assert torch.equal(lo, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]))
    assert torch.equal(up, torch.tensor([1.6, 0.0, 1.5, 0.0, 3.0]))  # only l < 0 < u shrinks
    net = bn_mlp()
    batch = random_batch(0.3)
    plain = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)[1]
    with relu_shrinking(0.8):
        shrunk = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)[1]
    after = net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper, Bound.IBP)[1]
    assert (shrunk > plain + 1e-4).any() and torch.equal(after, plain)
    with relu_shrinking(None):
        assert torch.equal(net.margin_bounds(batch.x, batch.y, batch.lower, batch.upper,
                                             Bound.IBP)[1], plain)


def _adam_net():
    net = bn_mlp(seed=2)
    return net, torch.optim.Adam(net.model.parameters(), lr=1e-2)


def test_edac_pre_step_changes_only_what_it_should():
    """One step of the run's own Adam on γ·mean_b std_k f(x_adv): the parameters move by that
    step, the gradient γ·∇L_AC(θ) stays in .grad for the training step, the running
    statistics see one clean pass, the optimiser's state counts one step, nothing else."""
    net, opt = _adam_net()
    batch = random_batch(0.2)
    edac = EDAC(gamma=0.3, attack=PGDConfig(steps=3, restarts=2, step_size=0.25, loss="ce"))
    twin, twin_opt = _adam_net()
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    torch.manual_seed(11)
    loss = edac.pre_step(net, opt, batch.x, batch.y, batch.lower, batch.upper)
    # the same by hand on a twin: clean pass, the same attack point, L_AC, one Adam step
    torch.manual_seed(11)
    twin(batch.x)
    from fastcert.attacks import pgd_attack
    with twin.batch_norm_stats(detach=True):
        _, x_adv = pgd_attack(twin.model, batch.x, batch.y, batch.lower, batch.upper, edac.attack)
    with twin.batch_norm_stats():
        want = 0.3 * twin.model(x_adv).std(dim=1).mean()
    want.backward()
    grads = [p.grad.clone() for p in twin.model.parameters()]
    twin_opt.step()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    for p, q, g in zip(net.model.parameters(), twin.model.parameters(), grads, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, g)   # same step; gradient kept
    changed = [k for k, v in net.model.state_dict().items() if not torch.equal(v, before[k])]
    running = {k for k in changed if "running" in k}
    assert running == {f"{i}.running_{s}" for i in (2, 5) for s in ("mean", "var")}
    for k, v in twin.model.state_dict().items():  # running statistics: one clean pass
        assert torch.equal(net.model.state_dict()[k], v), k
    assert set(changed) - running == {k for k, p in net.model.named_parameters()}
    assert all(s["step"] == 1 for s in opt.state.values()) and net.training


def test_aids_config_checks_its_values():
    aids = instantiate({"_target_": "fastcert.aids.Aids", "l1": "1e-6",
                        "swa": {"start": 3}, "edac": {"gamma": 0.1}}, "aids")
    assert aids.l1 == 1e-6 and aids.swa.start == 3 and aids.swa.every == 10
    assert aids.edac.attack.loss == "ce" and aids.relu_shrinkage is None
    for bad, key in [({"l1": -1}, "aids.l1"), ({"relu_shrinkage": 1.5}, "aids.relu_shrinkage"),
                     ({"swa": {"start": -1}}, "aids.swa.start"),
                     ({"edac": {"gamma": -0.1}}, "aids.edac.gamma"),
                     ({"precise": True}, "aids.precise")]:
        with pytest.raises(ConfigError, match=key):
            instantiate({"_target_": "fastcert.aids.Aids", **bad}, "aids")
    assert Aids() == instantiate({"_target_": "fastcert.aids.Aids"}, "aids")


def test_swa_average_is_averaged_models(monkeypatch):
    """The averager's snapshots (after steps t > start·N with t mod every = 0) averaged by
    torch's AveragedModel equal the plain mean of those snapshots."""
    from torch.optim.swa_utils import AveragedModel

    from fastcert.aids.swa import SWA, Averager

    net = _bn_net()
    averager = Averager(SWA(start=1, every=2), net, steps_per_epoch=3)
    snaps = []
    for step in range(9):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        averager.after_step(step)
        if step + 1 > 3 and (step + 1) % 2 == 0:
            snaps.append([p.detach().clone() for p in net.parameters()])
    assert averager.n_averaged == len(snaps) == 3   # t = 4, 6, 8
    reference = AveragedModel(net)
    for snap in snaps:
        with torch.no_grad():
            for p, s in zip(net.parameters(), snap):
                p.copy_(s)
        reference.update_parameters(net)
    for a, b, *s in zip(averager.average.module.parameters(), reference.module.parameters(),
                        *snaps, strict=True):
        assert torch.equal(a, b)
        assert torch.allclose(a, torch.stack(s).mean(0), rtol=1e-6, atol=1e-7)
    averager.swap_in(lambda: iter(_batches()))
    for p, b in zip(net.parameters(), reference.module.parameters(), strict=True):
        assert torch.equal(p, b)


def test_shrinking_changes_a_training_loss():
    from fastcert.methods import SABR

    net = bn_mlp()
    batch = random_batch(0.3, eps_target=0.3)
    method = SABR(lam=0.5)
    torch.manual_seed(0)
    plain = method.step(net, batch).loss
    torch.manual_seed(0)
    with relu_shrinking(0.8):
        shrunk = method.step(net, batch).loss
    assert shrunk < plain - 1e-3
    assert F.relu(torch.tensor(1.0)) == 1  # the patched operator is auto_LiRPA's, not torch's


@pytest.mark.parametrize("over,key", [
    (["nproc=2", "aids.edac.gamma=0.3"], "aids.edac.gamma>0 runs in one process only"),
    (["nproc=2", "optim.grad_acc_steps=2", "optim.grad_acc_bn=batch"], "optim.grad_acc_bn=batch"),
    (["epochs=5", "aids.swa.start=5"], "aids.swa.start=5: SWA must start before"),
    (["select.metric=clean_acc"], "select.split=val needs a validation split"),
])
def test_run_config_combinations_refused_before_training(compose, over, key):
    from fastcert.settings import validate

    with pytest.raises(ConfigError, match=key):
        validate(compose(["device=cpu", *over]))
