"""Every `experiment=` preset composes and builds its model and data pipeline (on tiny files
generated in the datasets' true on-disk formats), so no preset rots."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastcert.bounds import Bound
from fastcert.config import options
from fastcert.pipeline import build, run
from fastcert.schedules import SmoothedSchedule
from fastcert.settings import validate

from conftest import TINY, write_idx_set

PRESETS = options("experiment")


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """Fashion-MNIST's four gzipped idx files directly in the root, as Debian installs them."""
    root = tmp_path_factory.mktemp("fashion")
    write_idx_set(root, 40, 20, seed=4, gzipped=True)
    return root


@pytest.fixture
def roots(mnist_root, cifar_root, cifar_md5, tiny_root, fashion_root):
    return {"mnist": mnist_root[0], "cifar10": cifar_root[0], "tinyimagenet": tiny_root,
            "digits": tiny_root, "fashion_mnist": fashion_root, "digits_2v5": tiny_root,
            "mnist_2v5": mnist_root[0]}


SHI2021_TABLES = ("table1_mnist", "table1_cifar10_70", "table1_cifar10_160",
                  "table2_tinyimagenet_1_10_69", "table2_tinyimagenet_1_20_59")


def test_presets_exist_for_the_papers_tables():
    """A benchmark setting is a folder with one preset per method (so a sweep over the folder
    runs the row set, each method with its own keys)."""
    names = set(PRESETS)
    for table in SHI2021_TABLES:
        assert {f"shi2021/{table}/{m}" for m in ("ibp", "crown_ibp", "fast")} <= names, table
    assert {f"shi2021/table4/row{i}" for i in range(1, 9)} <= names


@pytest.mark.parametrize("table", SHI2021_TABLES)
def test_a_setting_folder_shares_the_setting_and_varies_the_method(compose, table):
    cfgs = {m: compose([f"experiment=shi2021/{table}/{m}"]) for m in ("ibp", "crown_ibp", "fast")}
    assert {c.method.name for c in cfgs.values()} == {"ibp", "crown_ibp", "fast"}
    shared = [(c.data.name, c.model.name, c.eps, c.epochs, c.schedule, c.optim)
              for c in cfgs.values()]
    assert shared[0] == shared[1] == shared[2]


def test_table2_fast_presets_carry_the_released_lambda0(compose):
    """λ0 = 0.2 on TinyImageNet (the released command: --reg-lambda=2e-1), 0.5 elsewhere; a
    method-specific key in the fast preset, which would break method=ibp in a shared preset."""
    for table in SHI2021_TABLES:
        cfg = compose([f"experiment=shi2021/{table}/fast"])
        assert cfg.method.warmup.lambda0 == (0.2 if table.startswith("table2") else 0.5), table


#: What the released code ran (its README command lines and config/*.json): auto_LiRPA's smoothed
#: schedule (start here = its start - 1), LR milestones (x0.2), batch, grad-acc chunks, and the
#: CIFAR normalisation std and crop padding of its datasets.py.
SHI_STD = [0.2023, 0.1994, 0.2010]
RELEASED = {
    "table1_mnist": dict(epochs=70, start=0, length=20, milestones=[50, 60], batch=256, acc=1),
    "table1_cifar10_70": dict(epochs=70, start=1, length=20, milestones=[50, 60], batch=128,
                              acc=1, std=SHI_STD, padding=2),
    "table1_cifar10_160": dict(epochs=160, start=1, length=80, milestones=[120, 140], batch=128,
                               acc=1, std=SHI_STD, padding=2),
    "table2_tinyimagenet_1_10_69": dict(epochs=80, start=1, length=10, milestones=[61, 71],
                                        batch=128, acc=2),
    "table2_tinyimagenet_1_20_59": dict(epochs=80, start=1, length=20, milestones=[61, 71],
                                        batch=128, acc=2),
}


@pytest.mark.parametrize("method", ["ibp", "crown_ibp", "fast"])
@pytest.mark.parametrize("table", SHI2021_TABLES)
def test_shi2021_presets_are_the_released_runs(compose, table, method):
    want = RELEASED[table]
    cfg = compose([f"experiment=shi2021/{table}/{method}"])
    assert cfg.epochs == want["epochs"] and cfg.model.name == "cnn7"
    assert cfg.schedule._target_ == "fastcert.schedules.SmoothedSchedule"
    assert (cfg.schedule.start, cfg.schedule.length) == (want["start"], want["length"])
    assert (cfg.schedule.mid, cfg.schedule.exponent) == (0.25, 4.0)
    assert list(cfg.optim.milestones) == want["milestones"]
    assert (cfg.optim.lr, cfg.optim.gamma, cfg.optim.grad_clip) == (5e-4, 0.2, 10.0)
    assert cfg.optim.grad_acc_steps == want["acc"] and cfg.data.batch_size == want["batch"]
    if "std" in want:
        assert list(cfg.data.std) == want["std"] and cfg.data.crop_padding == want["padding"]
    assert cfg.init.name == ("ibp" if method == "fast" else "default")
    if method == "crown_ibp":
        assert cfg.method.loss_fusion  # the released crown-ibp baseline fuses the loss


def test_generic_cifar10_defaults_are_unchanged(compose):
    """The released values live in the presets; ``data=cifar10`` keeps the training-set std
    and 4-pixel crop padding."""
    cfg = compose(["data=cifar10"])
    assert list(cfg.data.std) == [0.2471, 0.2435, 0.2616] and cfg.data.crop_padding == 4


def test_tinyimagenet_presets_keep_the_batch_and_split_it(compose, tiny_root):
    """--batch-size=128 --grad-acc-steps=2: one optimiser step and one ε per 128 images, BN
    statistics per chunk of 64 (fastcert.train.fit's meaning of optim.grad_acc_steps)."""
    import warnings

    cfg = compose(["experiment=shi2021/table2_tinyimagenet_1_20_59/fast", f"data.root={tiny_root}",
                   "device=cpu", "data.num_workers=0", "model.width=0.125"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build(validate(cfg))
    assert built.data.train.batch_size == 128 and built.settings.optim.grad_acc_steps == 2
    assert isinstance(built.schedule, SmoothedSchedule)


# ------------------------------------------------------------------------- CROWN-IBP presets

#: Parameter counts of the CROWN-IBP code's Fashion-MNIST models (its model_defs.py on 1x28x28).
CROWN_IBP_FASHION = {
    "fashion_mnist_crown/cnn_2layer_width_1": 52_182,
    "fashion_mnist_crown/cnn_2layer_width_2": 205_730,
    "fashion_mnist_crown/cnn_4layer_linear_256_width_1": 170_598,
    "fashion_mnist_crown/cnn_4layer_linear_256_width_2": 275_714,
    "fashion_mnist_crown/cnn_4layer_linear_512_width_1": 470_630,
    "fashion_mnist_crown/cnn_4layer_linear_512_width_2": 676_098,
    "fashion_mnist_crown/cnn_3layer_fixed_kernel_3_width_1": 27_170,
    "fashion_mnist_crown/cnn_3layer_fixed_kernel_3_width_2": 107_130,
    "fashion_mnist_crown/cnn_3layer_fixed_kernel_5_width_1": 21_090,
    "fashion_mnist_crown/cnn_3layer_fixed_kernel_5_width_2": 82_682,
    "fashion_mnist_crown_large/cnn_4layer_linear_256_width_4": 1_096_442,
    "fashion_mnist_crown_large/cnn_4layer_linear_512_width_4": 1_096_442,
    "fashion_mnist_crown_large/cnn_4layer_linear_512_width_8": 1_974_762,
    "fashion_mnist_crown_large/cnn_4layer_linear_512_width_16": 3_881_930,
    "fashion_mnist_crown_large/cnn_3layer_fixed_kernel_5_width_16": 2_833_802,
    "fashion_mnist_crown_large/cnn_3layer_fixed_kernel_5_width_8": 1_302_986,
    "fashion_mnist_crown_large/cnn_3layer_fixed_kernel_5_width_4": 625_130,
    "fashion_mnist_crown_large/cnn_3layer_fixed_kernel_3_width_8": 1_695_690,
}


def test_crown_ibp_fashion_mnist_presets_are_its_configs(compose):
    """config/fashion-mnist_crown{,_large}.json: one preset per model (the same parameter count
    as its model_defs.py) with the JSON's training parameters."""
    from fastcert.config import instantiate

    names = {p.removeprefix("crown_ibp/") for p in PRESETS if p.startswith("crown_ibp/fashion")}
    assert names == set(CROWN_IBP_FASHION)
    for name, count in CROWN_IBP_FASHION.items():
        cfg = compose([f"experiment=crown_ibp/{name}"])
        with torch.device("meta"):
            model = instantiate(cfg.model, "model", input_shape=(1, 28, 28), num_classes=10)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert model.bn == "none" and cfg.init.name == "default"
        assert cfg.data.name == "fashion_mnist" and cfg.data.batch_size == 256
        assert cfg.eps == 0.1 and cfg.eval.eps == 0.1 and cfg.epochs == 100
        assert cfg.schedule._target_ == "fastcert.schedules.LinearSchedule"
        assert (cfg.schedule.start, cfg.schedule.length) == (1, 60)
        assert (cfg.optim.lr, list(cfg.optim.milestones), cfg.optim.gamma) == (1e-3, [71, 81, 91],
                                                                               0.5)
        assert cfg.optim.grad_clip == float("inf")
        assert cfg.method.name == "crown_ibp" and not cfg.method.loss_fusion
        assert (cfg.method.beta_start, cfg.method.beta_end) == (1.0, 0.0)
        assert (cfg.method.kappa.start, cfg.method.kappa.end) == (0.0, 0.0)


def test_crown_ibps_lr_schedule_is_its_step_lr_after_the_ramp():
    """StepLR(10, 0.5) stepped with epoch = max(t - (start+length-1) + 1, 0) after each 0-based
    epoch t (start 1, length 61) gives the LR of milestones [71, 81, 91] x0.5."""
    from fastcert.optim import Adam

    param = torch.zeros(1, requires_grad=True)
    ours_opt, ours = Adam(lr=1e-3, milestones=[71, 81, 91], gamma=0.5).build([param])
    theirs_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    theirs = torch.optim.lr_scheduler.StepLR(theirs_opt, step_size=10, gamma=0.5)
    for t in range(100):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"]), t
        ours_opt.step()  # (no gradients: only the order torch expects)
        theirs_opt.step()
        ours.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # step(epoch) is deprecated
            theirs.step(epoch=max(t - (1 + 61 - 1) + 1, 0))


@pytest.mark.parametrize("eps,test_eps,start,length,kappa", [("0.4", 0.3, 10, 50, (1.0, 0.5)),
                                                          ("0.2", 0.1, 3, 17, (1.0, 0.5))])
def test_crown_ibp_mnist_dm_large_trains_and_tests_at_its_two_radii(compose, eps, test_eps, start,
                                                                    length, kappa):
    cfg = compose([f"experiment=crown_ibp/mnist_dm_large_{eps}/dm_large"])
    assert cfg.eps == float(eps) and cfg.eval.eps == test_eps
    assert (cfg.schedule.start, cfg.schedule.length) == (start, length)
    assert (cfg.method.kappa.start, cfg.method.kappa.end) == kappa
    assert cfg.model.name == "dm_large" and cfg.model.bn == "none"


def test_train_0_4_test_0_3_reaches_results_and_certify(compose, mnist_root, tmp_path):
    """CROWN-IBP's MNIST setting trains at ε=0.4 and tests at 0.3: results.json and
    ``python -m fastcert.certify`` (no eps given) report 0.3, the training radius 0.4."""
    import json

    from fastcert.certify import certify

    from conftest import compose_config

    run_dir = tmp_path / "run"
    cfg = compose(["experiment=crown_ibp/mnist_dm_large_0.4/dm_large", f"data.root={mnist_root[0]}",
                   *TINY, "model.width=0.125", "epochs=1", "data.batch_size=32",
                   "data.num_workers=0", "eval.verifiers=[ibp]", "eval.pgd.steps=2"])
    results = run(cfg, run_dir)
    assert results["eps"] == pytest.approx(0.3) and results["train_eps"] == pytest.approx(0.4)
    assert json.loads((run_dir / "results.json").read_text())["eps"] == pytest.approx(0.3)
    ccfg = compose_config("certify", [f"checkpoint={run_dir / 'last.pt'}", "attack=pgd",
                                      "attack.steps=2", "progress=false", "verifiers=[ibp]",
                                      "device=cpu"])
    summary = certify(ccfg, tmp_path / "certify")
    assert [r["eps"] for r in summary["results"]] == [pytest.approx(0.3)]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds(compose, roots, preset):
    cfg = compose([f"experiment={preset}"])
    cfg = compose([f"experiment={preset}", f"data.root={roots[cfg.data.name]}", "device=cpu",
                   "data.num_workers=0", "data.limit_test=4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "3 classes found, expected 200" for the tiny files
        built = build(validate(cfg))
    x, y = next(iter(built.data.train))
    assert tuple(x.shape[1:]) == built.data.input_shape
    assert built.schedule.eps_target == pytest.approx(cfg.eps)
    assert built.schedule.start + built.schedule.length <= cfg.epochs
    built.net.eval()
    lower, upper = built.data.eps_box(x[:2], cfg.eps)
    with torch.no_grad():
        logits, lb = built.net.margin_bounds(x[:2], y[:2], lower, upper, Bound.IBP)
    assert (logits.shape == (2, built.data.num_classes)
            and (lb <= logits.max(1).values[:, None]).all())


def test_table4_rows_toggle_the_ablation_components(compose):
    rows = {i: compose([f"experiment=shi2021/table4/row{i}"]) for i in range(1, 9)}
    warmup = {i: c.method.get("warmup", {}) for i, c in rows.items()}
    table = {i: (c.model.bn, c.init.name, c.method.name, warmup[i].get("tightness", False),
                 warmup[i].get("relu", False)) for i, c in rows.items()}
    assert table == {
        1: ("none", "default", "ibp", False, False),
        2: ("conv", "default", "ibp", False, False),
        3: ("full", "default", "ibp", False, False),
        4: ("full", "ibp", "ibp", False, False),
        5: ("full", "ibp", "fast", True, False),
        6: ("full", "ibp", "fast", False, True),
        7: ("full", "default", "fast", True, True),
        8: ("full", "ibp", "fast", True, True),
    }
