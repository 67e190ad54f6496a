"""Every `experiment=` preset composes and builds its model and data pipeline (on tiny files
generated in the datasets' true on-disk formats), so no preset rots."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastcert.pipeline import build

from conftest import CONF

PRESETS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                 for p in (CONF / "experiment").rglob("*.yaml"))


@pytest.fixture
def roots(mnist_root, cifar_root, cifar_md5, tiny_root):
    return {"mnist": mnist_root[0], "cifar10": cifar_root[0], "tinyimagenet": tiny_root,
            "digits": tiny_root}


def test_presets_exist_for_the_papers_tables():
    names = set(PRESETS)
    assert {"shi2021/table1_mnist", "shi2021/table1_cifar10_70", "shi2021/table1_cifar10_160",
            "shi2021/table2_tinyimagenet_1_10_69", "shi2021/table2_tinyimagenet_1_20_59"} <= names
    assert {f"shi2021/table4_row{i}" for i in range(1, 9)} <= names


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
        logits, lb = built.net.margin_bounds(x[:2], y[:2], lower, upper, "ibp")
    assert logits.shape == (2, built.data.num_classes) and (lb <= logits.max(1).values[:, None]).all()


def test_table4_rows_toggle_the_ablation_components(compose):
    rows = {i: compose([f"experiment=shi2021/table4_row{i}"]) for i in range(1, 9)}
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
