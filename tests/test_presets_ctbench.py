"""conf/setting/ctbench and conf/experiment/ctbench: one folder per CTBench setting with one
preset per method, CTBench's published values, and the row-set sweep on the command line.
(tests/test_presets.py builds every preset.)"""
from __future__ import annotations

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fastcert.config import options

from conftest import CONF

SETTINGS = ("mnist_0_1", "mnist_0_3", "cifar10_2", "cifar10_8", "tinyimagenet_1")
METHODS = ("ibp", "crown_ibp", "fast", "sabr", "taps", "staps", "mtl_ibp", "cc_ibp", "exp_ibp",
           "pgd")
# keys a method's script changes from its setting (CTBench scripts/examples)
PER_METHOD = {("mnist_0_3", "taps"): {"eps"}, ("cifar10_2", "sabr"): {"eps"},
              ("tinyimagenet_1", "exp_ibp"): {"epochs", "schedule", "optim"},
              ("tinyimagenet_1", "crown_ibp"): {"optim"}, ("tinyimagenet_1", "taps"): {"optim"},
              ("tinyimagenet_1", "staps"): {"optim"},
              # no CTBench script: De Palma et al.'s recipes (tests/test_ctbench_transcriptions.py)
              ("mnist_0_3", "cc_ibp"): {"eps"}, ("mnist_0_3", "exp_ibp"): {"eps"},
              ("cifar10_8", "cc_ibp"): {"epochs", "schedule", "optim"},
              ("cifar10_8", "exp_ibp"): {"epochs", "schedule", "optim"}}


def test_every_setting_has_a_preset_per_method():
    assert {s for s in options("setting") if s.startswith("ctbench/")} == {
        f"ctbench/{s}" for s in SETTINGS}
    assert {p for p in options("experiment") if p.startswith("ctbench/")} == {
        f"ctbench/{s}/{m}" for s in SETTINGS for m in METHODS}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_row_set_sweep_expands_to_every_method(setting):
    """``-m '+experiment/ctbench/<setting>=glob(*)'`` is a valid override (no '.' in the group
    path) whose glob matches the ten presets (``experiment=glob(ctbench/<setting>/*)`` would
    match none: Hydra lists a group's options one folder deep)."""
    (override,) = OverridesParser.create().parse_overrides(
        [f"+experiment/ctbench/{setting}=glob(*)"])
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    found = override.value().filter(loader.get_group_options(f"experiment/ctbench/{setting}"))
    assert sorted(found) == sorted(METHODS)


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_setting_folder_shares_the_setting(compose, setting):
    cfgs = {m: compose([f"experiment=ctbench/{setting}/{m}"]) for m in METHODS}
    assert {m: c.method.name for m, c in cfgs.items()} == {m: m for m in METHODS}
    ref = cfgs["ibp"]
    for m, c in cfgs.items():
        assert (c.data.name, c.model.name, c.model.bn, c.eval.eps) == (
            ref.data.name, "cnn7", "full", ref.eval.eps), m
        for key in ("eps", "epochs", "schedule", "optim"):
            if key not in PER_METHOD.get((setting, m), ()):
                assert c[key] == ref[key], (m, key)
        assert c.schedule.name == "smoothed" and c.optim.lr == 5e-4 and c.optim.grad_clip == 10
        assert c.init.name == ("kaiming_uniform" if m == "pgd" else "ibp"), m


def _values(compose, key):
    """``method.<key[1]>`` (a dotted path) of the preset ctbench/<setting>/<key[0]>, per setting."""
    return tuple(OmegaConf.select(compose([f"experiment=ctbench/{s}/{key[0]}"]).method, key[1])
                 for s in SETTINGS)


def test_published_settings_and_hyper_parameters(compose):
    """CTBench's example scripts (scripts/examples), setting by setting in SETTINGS order."""
    cfgs = [compose([f"experiment=ctbench/{s}/ibp"]) for s in SETTINGS]
    assert [(c.epochs, c.data.batch_size, c.schedule.start, c.schedule.length,
             list(c.optim.milestones)) for c in cfgs] == [
        (70, 256, 0, 20, [50, 60]), (70, 256, 0, 20, [50, 60]), (160, 128, 1, 80, [120, 140]),
        (240, 128, 1, 120, [200, 220]), (160, 128, 1, 80, [120, 140])]
    assert [(c.eps, c.eval.eps) for c in cfgs[:2]] == [(0.2, 0.1), (0.3, 0.3)]
    assert [round(c.eval.eps * 255, 6) for c in cfgs[2:]] == [2, 8, 1]
    assert _values(compose, ("sabr", "lam")) == (0.4, 0.9, 0.1, 0.9, 0.4)
    assert _values(compose, ("staps", "lam")) == (0.4, 0.6, 0.1, 0.9, 0.6)
    assert _values(compose, ("taps", "head_blocks")) == (3, 2, 5, 1, 1)
    assert _values(compose, ("taps", "grad_scale")) == (4.0, 4.0, 4.0, 2.0, 8.0)
    assert _values(compose, ("mtl_ibp", "alpha")) == (0.02, 0.5, 0.01, 0.6, 0.05)
    assert _values(compose, ("mtl_ibp", "attack_eps_factor")) == (1.0, 1.0, 2.0, 1.0, 1.5)
    assert _values(compose, ("fast", "warmup.lambda0")) == (0.5, 0.5, 0.5, 0.5, 0.2)
    assert _values(compose, ("ibp", "kappa.start")) == (0.3, 0.3, pytest.approx(0.2), 0.0, 0.0)
    assert [compose([f"experiment=ctbench/{s}/pgd"]).method.attack.steps for s in SETTINGS] == [
        10, 5, 8, 10, 1]
    taps = compose(["experiment=ctbench/mnist_0_3/taps"])
    assert taps.eps == 0.4 and taps.eval.eps == 0.3
    exp_tin = compose(["experiment=ctbench/tinyimagenet_1/exp_ibp"])
    assert (exp_tin.epochs, exp_tin.schedule.length, list(exp_tin.optim.milestones)) == (
        80, 20, [60, 70])
    crown = compose(["experiment=ctbench/cifar10_8/crown_ibp"]).method
    assert (crown.beta_start, crown.beta_end, crown.loss_fusion) == (1.0, 1.0, True)
