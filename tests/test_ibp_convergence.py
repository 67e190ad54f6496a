"""The IBP convergence experiment of Wang 2022 (thesis Ch. 4, Fig. 4.1): the binary two-class
data source (fastcert.data.TwoClasses), the two-layer network of Eq. 4.1
(fastcert.models.two_layer), its IBP bound (auto_LiRPA, checked against the closed form of
Eq. 4.5) and loss, and experiments.ibp_convergence."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcert.bounds import Bound, BoundedNet, robust_ce_from_margins
from fastcert.config import ConfigError, build_option, instantiate

# ------------------------------------------------------------------------------ the data


def test_digits_2v5_is_the_twos_and_fives_of_the_digits_training_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bundle = build_option("data", "digits_2v5").load(seed=0)
    d = load_digits()
    idx, _ = train_test_split(list(range(len(d.target))), test_size=0.2, stratify=d.target,
                              random_state=0, shuffle=True)
    labels = d.target[idx]
    keep = np.isin(labels, [2, 5])
    x, y = bundle.train.dataset.tensors
    assert bundle.num_classes == 2 and bundle.input_shape == (1, 8, 8)
    assert len(y) == keep.sum() == 287
    assert y.tolist() == (labels[keep] == 5).astype(int).tolist()  # 5 -> 1 (y=+1), 2 -> 0
    images = torch.tensor(d.images[idx][keep], dtype=torch.float32).div(16).unsqueeze(1)
    torch.testing.assert_close(x, images)
    # evaluate_on=train: the final evaluation iterates the training set
    assert bundle.test.dataset is bundle.train.dataset
    assert bundle.name == "digits_2v5"


def test_the_box_is_unclipped_unless_asked():
    """Eq. 4.3 of the thesis perturbs within [x - ε, x + ε], whatever the data range."""
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    lower, upper = build_option("data", "digits_2v5").load(0).eps_box(x, 0.1)
    torch.testing.assert_close(lower, x - 0.1)
    torch.testing.assert_close(upper, x + 0.1)
    lower, upper = build_option("data", "digits_2v5", {"clip": True}).load(0).eps_box(x, 0.1)
    assert lower.min() == 0 and upper.max() == 1


def test_the_unclipped_box_contains_the_exact_box():
    """Rounded outward like the clipped box: float32 x ± ε can fall 1 ulp inside [x-ε, x+ε]."""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)).view(1, 1, 64, 64)
    bundle = build_option("data", "digits_2v5").load(0)
    for eps in (0.1, 0.3, 1 / 255):
        lower, upper = bundle.eps_box(x, eps)
        assert ((lower.double() <= x.double() - eps).all()
                and (upper.double() >= x.double() + eps).all())
        assert ((x - eps) > x.double() - eps).any() or ((x + eps) < x.double() + eps).any()


def test_any_mnist_format_set_gives_the_task(compose, mnist_root):
    root, data = mnist_root
    cfg = compose(["data=mnist_2v5", f"data.root={root}"])  # the source reads data.root
    bundle = instantiate(cfg.data, "data").load(0)
    x_raw, y_raw = data["train"]
    keep = np.isin(y_raw, [2, 5])
    x, y = bundle.train.dataset.tensors
    assert len(y) == keep.sum() > 0 and x.shape[1:] == (1, 28, 28)
    assert y.tolist() == (y_raw[keep] == 5).astype(int).tolist()
    torch.testing.assert_close(x, torch.tensor(x_raw[keep], dtype=torch.float32).div(255)[:, None])


def test_bad_classes_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="data.classes"):
        build_option("data", "digits_2v5", {"classes": [3, 3]})
    with pytest.raises(ValueError, match="class 11 has no training example"):
        build_option("data", "digits_2v5", {"classes": [2, 11]}).load(0)
    with pytest.raises(ConfigError, match="evaluate_on"):
        build_option("data", "digits_2v5", {"evaluate_on": "val"})


# ------------------------------------------------------------------------------ the network


def _two_layer(m=4000, seed=0, classes=2, bn="none"):
    torch.manual_seed(seed)
    return build_option("model", "two_layer", {"m": m, "bn": bn}, input_shape=(1, 8, 8),
                        num_classes=classes)


def test_two_layer_is_eq_4_1_with_the_output_layer_fixed():
    """f = (1/√m) Σ a_r σ(w_rᵀx): no hidden bias, w_r ~ N(0, I), a_r = ±1 (about half each),
    logits (0, f), and only W trains."""
    model = _two_layer()
    hidden, output = model[1], model[3]
    assert hidden.bias is None and hidden.weight.shape == (4000, 64)
    w = hidden.weight.detach()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1) < 0.01
    a = output.weight.detach() * math.sqrt(4000)
    assert (a[0] == 0).all() and set(a[1].unique().tolist()) == {-1.0, 1.0}
    assert abs((a[1] > 0).float().mean().item() - 0.5) < 0.05
    assert (output.bias == 0).all()
    assert [name for name, _ in model.named_parameters()] == ["1.weight"]  # only W trains
    x = torch.rand(5, 1, 8, 8)
    f = (a[1] * torch.relu(x.flatten(1) @ w.T)).sum(1) / math.sqrt(4000)
    logits = model(x)
    torch.testing.assert_close(logits[:, 0], torch.zeros(5))
    torch.testing.assert_close(logits[:, 1], f)


def test_ce_on_the_two_logits_is_the_logistic_loss():
    """Eq. 4.2: l(y f) = log(1 + exp(-y f)) with y = +1 for label 1, -1 for label 0; and the
    robust CE of the IBP margin bound is Eq. 4.3's log(1 + exp(-u̲))."""
    model = _two_layer(m=50)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    f = model(x)[:, 1]
    sign = 2 * y.float() - 1
    torch.testing.assert_close(F.cross_entropy(model(x), y), F.softplus(-sign * f).mean())
    u = torch.randn(6, 1)
    torch.testing.assert_close(robust_ce_from_margins(u), F.softplus(-u).mean())


def _closed_form_lower(model, x, y, eps):
    """Eq. 4.5 of Wang 2022 (sign corrected):
    u̲ = (1/√m) Σ_r [1(y a_r = 1) σ(w_rᵀx - ε‖w_r‖₁) - 1(y a_r = -1) σ(w_rᵀx + ε‖w_r‖₁)]."""
    w = model[1].weight
    m = w.shape[0]
    a = model[3].weight[1] * math.sqrt(m)
    pre = x.flatten(1) @ w.T
    radius = eps * w.abs().sum(1)
    ya = (2 * y.float() - 1)[:, None] * a[None]
    lower = (ya > 0) * torch.relu(pre - radius) - (ya < 0) * torch.relu(pre + radius)
    return lower.sum(1) / m ** 0.5


@pytest.mark.parametrize("eps", [0.001, 0.04, 0.3])
def test_auto_lirpa_ibp_equals_the_closed_form_and_its_gradient(eps):
    """Training bounds come from auto_LiRPA's IBP (fastcert's margin bounds); on the two-layer
    net they equal the closed form of Eq. 4.5, and so does the gradient w.r.t. W: the thesis'
    ∂u̲/∂w_r = (1/√m) y a_r (A⁺_r (x - ε sign w_r) + A⁻_r (x + ε sign w_r)), A⁺ / A⁻ the
    indicators of the active lower / upper pre-activation of the term that counts."""
    model = _two_layer(m=300, seed=1)
    net = BoundedNet(model, torch.zeros(2, 1, 8, 8), 2).train()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(7, 1, 8, 8, generator=g), torch.randint(0, 2, (7,), generator=g)
    _, lb = net.margin_bounds(x, y, x - eps, x + eps, Bound.IBP)
    closed = _closed_form_lower(model, x, y, eps)
    torch.testing.assert_close(lb[:, 0], closed, rtol=1e-5, atol=1e-5)
    (grad_lirpa,) = torch.autograd.grad(lb[:, 0].sum(), model[1].weight)
    w = model[1].weight.detach()
    a = model[3].weight[1] * math.sqrt(300)
    xs = x.flatten(1)
    sign = torch.where(w >= 0, 1.0, -1.0)
    expected = torch.zeros_like(w)
    for i in range(7):
        ya = (2 * y[i] - 1) * a
        lo = w @ xs[i] - eps * w.abs().sum(1)
        hi = w @ xs[i] + eps * w.abs().sum(1)
        plus = ((ya > 0) & (lo > 0)).float()[:, None] * (xs[i] - eps * sign)
        minus = ((ya < 0) & (hi > 0)).float()[:, None] * (xs[i] + eps * sign)
        expected += ya[:, None] * (plus + minus) / math.sqrt(300)
    torch.testing.assert_close(grad_lirpa, expected, rtol=1e-4, atol=1e-5)


def test_a_run_trains_only_the_first_layer_and_evaluates_on_the_training_set(compose, tmp_path):
    from fastcert.pipeline import build, run
    from fastcert.settings import validate

    overrides = ["experiment=wang2022/digits_2v5/ibp", "device=cpu", "model.m=64", "epochs=2",
                 "eps=0.02", "eval.pgd.steps=2"]
    cfg = compose(overrides)
    assert cfg.schedule.start == 0 and cfg.schedule.length == 0  # ε fixed from the first step
    assert cfg.optim._target_ == "fastcert.optim.SGD" and cfg.init.name == "default"
    built = build(validate(cfg))
    before = {k: v.clone() for k, v in built.net.model.state_dict().items()}
    results = run(cfg, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    assert not torch.equal(state["1.weight"], before["1.weight"])
    assert torch.equal(state["3.weight"], before["3.weight"])  # a stays fixed
    assert torch.equal(state["3.bias"], before["3.bias"])
    assert results["n_test"] == 287 and results["data"] == "digits_2v5"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["eps"] == pytest.approx(0.02) for r in records)


# ------------------------------------------------------------------------------ the experiment


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_experiment_writes_both_figures_and_their_data(tmp_path):
    """A subset of the sweep (two widths, one epoch) through the real Hydra multiruns: both PNGs,
    their CSVs aggregating the runs' results.json, and runs.csv with every run."""
    from experiments import ibp_convergence

    out = ibp_convergence.main(["--out", str(tmp_path), "--widths", "8", "16", "--eps-a",
                                "0.02", "0.3", "--widths-b", "8", "16", "--eps-b", "0.05",
                                "--seeds", "0", "--epochs", "1"])
    for name in ("fig4_1a.png", "fig4_1b.png", "fig4_1a.csv", "fig4_1b.csv", "runs.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    runs = _read_csv(tmp_path / "runs.csv")
    assert len(runs) == 2 + 4 + 2
    a = _read_csv(tmp_path / "fig4_1a.csv")
    assert {(r["method"], float(r["eps"]), int(r["m"])) for r in a} == {
        ("natural", 0.0, 8), ("natural", 0.0, 16), ("ibp", 0.02, 8), ("ibp", 0.02, 16),
        ("ibp", 0.3, 8), ("ibp", 0.3, 16)}
    b = _read_csv(tmp_path / "fig4_1b.csv")
    assert {(int(r["m"]), float(r["eps"])) for r in b} == {(8, 0.05), (16, 0.05)}
    results = {}
    for path in (tmp_path / "runs").rglob("results.json"):
        r = json.loads(path.read_text())
        results.setdefault(r["method"], []).append(r)
    natural = [p for p in out["a"] if p["method"] == "natural"]
    assert sorted(p["train_error_mean"] for p in natural) == pytest.approx(
        sorted(1 - r["clean_acc"] for r in results["natural"]))
    ibp = sorted([p["train_error_mean"] for p in out["a"] if p["method"] == "ibp"] +
                 [p["train_error_mean"] for p in out["b"]])
    assert ibp == pytest.approx(sorted(1 - r["ibp_verified_acc"] for r in results["ibp"]))


def test_aggregate_is_mean_and_std_over_seeds():
    from experiments.ibp_convergence import aggregate

    rows = [{"m": 10, "eps": 0.1, "seed": s, "train_error": e} for s, e in enumerate((0.2, 0.4))]
    rows.append({"m": 20, "eps": 0.1, "seed": 0, "train_error": 0.0})
    assert aggregate(rows, ("m", "eps")) == [
        {"m": 10, "eps": 0.1, "seeds": 2, "train_error_mean": pytest.approx(0.3),
         "train_error_std": pytest.approx(0.1414, abs=1e-4)},
        {"m": 20, "eps": 0.1, "seeds": 1, "train_error_mean": 0.0, "train_error_std": 0.0}]


@pytest.mark.slow
def test_quick_runs_in_minutes_and_writes_the_figures(tmp_path):
    import time

    from experiments import ibp_convergence

    t0 = time.perf_counter()
    ibp_convergence.main(["--quick", "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 300
    for name in ("fig4_1a.png", "fig4_1b.png", "fig4_1a.csv", "fig4_1b.csv"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_the_thesis_claims_hold_on_small_sizes(tmp_path):
    """Sec. 4.3 / Fig. 4.1 of Wang 2022 on the digits, widths 10 and 1000, 70 epochs: natural
    training reaches ~0 training error; at a small ε the IBP-certified training error falls as
    m grows; at a large ε it stays far from 0 for every m."""
    from experiments import ibp_convergence

    out = ibp_convergence.main(["--out", str(tmp_path), "--widths", "10", "1000",
                                "--eps-a", "0.05", "0.3", "--widths-b", "10", "1000",
                                "--eps-b", "0.02", "--seeds", "0"])
    err = {(p["method"], p["eps"], p["m"]): p["train_error_mean"] for p in out["a"]}
    assert err[("natural", 0.0, 10)] <= 0.02 and err[("natural", 0.0, 1000)] <= 0.02
    assert err[("ibp", 0.05, 1000)] < err[("ibp", 0.05, 10)] - 0.2
    assert err[("ibp", 0.05, 1000)] <= 0.1
    assert min(err[("ibp", 0.3, 10)], err[("ibp", 0.3, 1000)]) >= 0.4
