"""The data and method details CTBench's numbers depend on: gradient accumulation with the whole
batch's BatchNorm statistics, SABR/STAPS's centre search on the clean batch's statistics, the
TAPS latent step decay, CROWN-IBP with the warmup regulariser, Kaiming init keeping PyTorch's
biases, MNIST's normalisation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastcert.attacks import PGDConfig
from fastcert.bounds import Bound, robust_ce_from_margins
from fastcert.config import build_option
from fastcert.methods import SABR, CrownIBP, Warmup
from fastcert.methods.sabr import propagation_box
from fastcert.whole_batch_bn import whole_batch_statistics

from conftest import bn_mlp, random_batch


def _running(net):
    return {k: v.clone() for k, v in net.model.state_dict().items() if "running" in k}


def test_whole_batch_statistics_serve_every_chunk():
    """Inside the context a chunk is normalised as its rows of the whole batch are (clean
    logits and IBP bounds), the running statistics saw one clean pass, and the chunks'
    gradients sum to the whole batch's."""
    batch = random_batch(0.1, n=8)
    x, y, lo, up = batch.x, batch.y, batch.lower, batch.upper
    ref = bn_mlp()
    logits, lb = ref.margin_bounds(x, y, lo, up, Bound.IBP)
    robust_ce_from_margins(lb).backward()
    want_grads = [p.grad.clone() for p in ref.model.parameters()]
    once = bn_mlp()
    once(x)
    net = bn_mlp()
    with whole_batch_statistics(net, x):
        for part in (slice(0, 3), slice(3, 8)):
            c_logits, c_lb = net.margin_bounds(x[part], y[part], lo[part], up[part], Bound.IBP)
            assert torch.allclose(c_logits, logits[part], atol=1e-5)
            assert torch.allclose(c_lb, lb[part], atol=1e-5)
            assert torch.allclose(net.model(x[part]), logits[part], atol=1e-5)
            share = (part.stop - part.start) / 8
            (robust_ce_from_margins(c_lb) * share).backward(retain_graph=part.start == 0)
    for p, g in zip(net.model.parameters(), want_grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=2e-5)  # ~0 grads of pre-BN biases
    for k, v in _running(once).items():
        assert torch.equal(_running(net)[k], v), k
    assert not torch.allclose(net(x[:3]), logits[:3], atol=1e-3)  # own statistics again


def test_grad_accumulation_with_whole_batch_statistics_in_a_run(compose, tmp_path):
    """optim.grad_acc_bn=batch trains through the loop (a different trajectory from per-chunk
    statistics); with one chunk it changes nothing."""
    from fastcert.pipeline import run
    from fastcert.train import read_metrics

    over = ["debug=smoke", "device=cpu", "data.limit_train=96", "data.limit_test=16",
            "model.widths=[16,16]", "epochs=1"]
    for name, extra in (("whole", ["optim.grad_acc_steps=2", "optim.grad_acc_bn=batch"]),
                        ("chunk", ["optim.grad_acc_steps=2"]), ("one", []),
                        ("one_whole", ["optim.grad_acc_bn=batch"])):
        run(compose(over + extra), tmp_path / name)
    loss = {n: read_metrics(tmp_path / n / "metrics.jsonl")[0]["loss"]
            for n in ("whole", "chunk", "one", "one_whole")}
    assert loss["whole"] != loss["chunk"] and loss["one"] == loss["one_whole"]


def test_centre_search_on_the_clean_batch_statistics():
    """search_bn=clean: the PGD centre of CTBench (BatchNorm with the clean batch's
    statistics), a different point from the eval-mode search, and the running statistics are
    updated once per step in both modes."""
    batch = random_batch(0.3, eps_target=0.3)
    attack = PGDConfig(steps=4, restarts=1, step_size=0.5, loss="ce")
    boxes, running = {}, {}
    for mode in ("eval", "clean"):
        net = bn_mlp()
        torch.manual_seed(0)
        boxes[mode] = propagation_box(net, batch, 0.3, attack, mode)
        torch.manual_seed(0)
        SABR(lam=0.3, attack=attack, search_bn=mode).step(net, batch)
        running[mode] = _running(net)
    twin = bn_mlp()
    twin(batch.x)
    from fastcert.attacks import pgd_attack
    torch.manual_seed(0)
    with twin.batch_norm_stats(detach=True):
        _, x_adv = pgd_attack(twin.model, batch.x, batch.y, batch.lower, batch.upper, attack)
    from fastcert.methods.sabr import small_box
    want = small_box(batch.lower, batch.upper, x_adv, 0.3)
    assert torch.equal(boxes["clean"][0], want[0]) and torch.equal(boxes["clean"][1], want[1])
    assert not torch.equal(boxes["clean"][0], boxes["eval"][0])
    for k, v in running["eval"].items():
        assert torch.equal(running["clean"][k], v), k


def test_latent_step_decay():
    cfg = PGDConfig(steps=10, step_size=0.4, step_decay=0.2, decay_at=(7,))
    assert [cfg.step(k) for k in range(10)] == pytest.approx([0.4] * 7 + [0.08] * 3)
    assert PGDConfig(step_size=0.4).step(9) == 0.4
    two = PGDConfig(steps=60, step_size=1.0, step_decay=0.2, decay_at=(24, 42))
    assert (two.step(23), two.step(24), two.step(42)) == pytest.approx((1.0, 0.2, 0.04))
    assert "x0.2 from step 7" in cfg.description
    with pytest.raises(ValueError, match="step_decay"):
        PGDConfig(step_decay=0.0)


def test_crown_ibp_with_the_warmup_regulariser():
    batch = random_batch(0.05, eps_target=0.1, diagnostics=True)
    plain = CrownIBP(beta_start=1.0, beta_end=1.0)
    reg = dataclasses.replace(plain, warmup=Warmup(lambda0=0.5))
    a, b = plain.step(bn_mlp(), batch), reg.step(bn_mlp(), batch)
    lam = 0.5 * (1 - 0.05 / 0.1)
    want = a.loss + lam * (b.diagnostics["reg/tightness"] + b.diagnostics["reg/relu"])
    assert b.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert b.stats["lambda"] == pytest.approx(lam) and "lambda" not in a.stats
    zero = reg.step(bn_mlp(), random_batch(0.0, eps_target=0.1))  # the min_eps_reg box
    assert zero.loss > zero.stats["loss/natural"] + 1e-3


def test_kaiming_init_can_keep_pytorchs_biases():
    from fastcert.initializers import KaimingUniform

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    biases = [net[0].bias.clone(), net[2].bias.clone()]
    KaimingUniform(zero_bias=False)(net, seed=1)
    assert torch.equal(net[0].bias, biases[0]) and torch.equal(net[2].bias, biases[1])
    assert net[0].weight.abs().max() <= (6 / 10) ** 0.5
    KaimingUniform()(net, seed=1)
    assert not net[0].bias.any() and not net[2].bias.any()
    init = build_option("init", "kaiming_uniform", {"zero_bias": False})
    assert init.zero_bias is False


def test_mnist_normalisation_is_configurable(mnist_root):
    root, sets = mnist_root
    d = build_option("data", "mnist", {"root": str(root), "mean": [0.1307], "std": [0.3081],
                                       "num_workers": 0}).load()
    x, _ = next(iter(d.test))
    images = torch.tensor(sets["t10k"][0][: len(x)], dtype=torch.float32).unsqueeze(1) / 255
    assert torch.allclose(x, (images - 0.1307) / 0.3081, atol=1e-6)
    lower, upper = d.eps_box(x, 0.1)
    assert torch.allclose((upper - lower).max(), torch.tensor(0.2 / 0.3081), atol=1e-5)
