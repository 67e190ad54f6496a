"""Every `experiment=` preset composes and builds its model and data pipeline (on tiny files
generated in the datasets' true on-disk formats), so no preset rots."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastcert.bounds import Bound
from fastcert.pipeline import build

from fastcert.config import options

PRESETS = options("experiment")


@pytest.fixture
def roots(mnist_root, cifar_root, cifar_md5, tiny_root):
    return {"mnist": mnist_root[0], "cifar10": cifar_root[0], "tinyimagenet": tiny_root,
            "digits": tiny_root, "digits_2v5": tiny_root, "mnist_2v5": mnist_root[0]}


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


def test_table2_fast_presets_carry_lambda0_0_1(compose):
    """Sec. 4.2 of Shi et al. 2021: λ0 = 0.1 on TinyImageNet, 0.5 elsewhere; a method-specific
    key in the fast preset, which would break method=ibp in a shared preset."""
    for table in SHI2021_TABLES:
        cfg = compose([f"experiment=shi2021/{table}/fast"])
        assert cfg.method.lambda0 == (0.1 if table.startswith("table2") else 0.5), table


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds(compose, roots, preset):
    cfg = compose([f"experiment={preset}"])
    cfg = compose([f"experiment={preset}", f"data.root={roots[cfg.data.name]}", "device=cpu",
                   "data.num_workers=0", "data.limit_test=4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "3 classes found, expected 200" for the tiny files
        built = build(cfg)
    x, y = next(iter(built.data.train))
    assert tuple(x.shape[1:]) == built.data.input_shape
    assert built.schedule.eps_target == pytest.approx(cfg.eps)
    assert built.schedule.start + built.schedule.length <= cfg.epochs
    built.net.eval()
    lower, upper = built.data.eps_box(x[:2], cfg.eps)
    with torch.no_grad():
        logits, lb = built.net.margin_bounds(x[:2], y[:2], lower, upper, Bound.IBP)
    assert logits.shape == (2, built.data.num_classes) and (lb <= logits.max(1).values[:, None]).all()


def test_table4_rows_toggle_the_ablation_components(compose):
    rows = {i: compose([f"experiment=shi2021/table4/row{i}"]) for i in range(1, 9)}
    table = {i: (c.model.bn, c.init.name, c.method.name, c.method.get("tightness", False),
                 c.method.get("relu", False)) for i, c in rows.items()}
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
